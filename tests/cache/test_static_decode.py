"""Packed causal LMs generate through transformers' static KV cache unless something else chose."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.cache_utils import StaticCache

import slimline as sl
from slimline.cache.static_decode import SET_ATTR

RTN4 = {"method": "rtn", "bits": 4, "group_size": 32}


def _caches_seen(model: nn.Module, run: Any) -> list[type]:
    """The cache classes ``model.forward`` received while ``run()`` ran."""
    seen: list[type] = []

    def note(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            seen.append(type(cache))

    handle = model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def _padded_prompts(vocab: int, pad: int) -> dict[str, torch.Tensor]:
    """Two left-padded rows of different lengths, as a user's batch arrives."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_packed_model_decodes_through_static_cache_with_unchanged_greedy_output(
    family: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(family)
    result = sl.compress(model, [RTN4])
    out = result.model
    assert out.generation_config.cache_implementation == "static"
    assert model.generation_config.cache_implementation is None  # the input model untouched
    assert any("static KV cache" in n for n in result.steps[-1].notes)
    batch = _padded_prompts(model.config.vocab_size, pad=0)
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}

    static: list[torch.Tensor] = []
    seen = _caches_seen(out, lambda: static.append(out.generate(**batch, **kwargs)))
    assert seen and all(issubclass(c, StaticCache) for c in seen)
    dynamic = out.generate(**batch, **kwargs, cache_implementation="dynamic")
    assert torch.equal(static[0], dynamic)


def test_float_model_and_user_choice_are_left_alone(tiny_llama: nn.Module) -> None:
    pruned = sl.compress(tiny_llama, [{"method": "magnitude", "sparsity": 0.5}]).model
    assert pruned.generation_config.cache_implementation is None  # no packed layers
    tiny_llama.generation_config.cache_implementation = "dynamic"
    assert sl.compress(tiny_llama, [RTN4]).model.generation_config.cache_implementation == "dynamic"


@pytest.mark.parametrize("step", [{"method": "kv_cache", "bits": 8},
                                  {"method": "speculative", "mode": "prompt_lookup"}])
def test_steps_that_own_their_cache_keep_the_dynamic_one(
    tiny_llama: nn.Module, step: dict[str, Any]
) -> None:
    together = sl.compress(tiny_llama, [RTN4, step]).model
    assert together.generation_config.cache_implementation is None
    assert not getattr(together, SET_ATTR, False)
    # A later compress undoes the static cache the first one chose.
    later = sl.compress(sl.compress(tiny_llama, [RTN4]).model, [step])
    assert later.model.generation_config.cache_implementation is None
    assert any("dynamic KV cache again" in n for n in later.steps[-1].notes)


def test_a_user_choice_made_after_compress_is_kept(tiny_llama: nn.Module) -> None:
    out = sl.compress(tiny_llama, [RTN4]).model
    out.generation_config.cache_implementation = "offloaded"
    again = sl.compress(out, [{"method": "kv_cache", "bits": 8}]).model
    assert again.generation_config.cache_implementation == "offloaded"


def test_load_chooses_it_again(tiny_llama: nn.Module, tmp_path: Any) -> None:
    out = sl.compress(tiny_llama, [RTN4]).model
    sl.save(out, tmp_path / "m")
    loaded = sl.load(tmp_path / "m")
    assert loaded.generation_config.cache_implementation == "static"


def test_classes_without_static_cache_support_are_left_alone(tiny_llama: nn.Module) -> None:
    # transformers 5.24 marks the classes whose caches may be static with
    # ``_can_compile_fullgraph``; the test fails loudly if a release drops the marker.
    assert LlamaForCausalLM._can_compile_fullgraph and GPT2LMHeadModel._can_compile_fullgraph

    class NoStatic(LlamaForCausalLM):
        _can_compile_fullgraph = False

    model = NoStatic(tiny_llama.config).eval()
    assert sl.compress(model, [RTN4]).model.generation_config.cache_implementation is None
