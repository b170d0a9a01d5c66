"""``fast_decode``: the written-out decode step against the model's own forward."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.compile.fast_decode import FastForward, attend_one, rotate
from slimline.compile.kv_room import append_in_place

pytestmark = pytest.mark.usefixtures("one_thread")


def fast(model: nn.Module, *steps: dict[str, Any], calibration: Any = None) -> nn.Module:
    recipe = {"steps": [*steps, {"method": "fast_decode"}]}
    return sl.compress(model, recipe, calibration=calibration).model


def calls(model: nn.Module) -> int:
    forward = vars(model)["forward"]
    assert isinstance(forward, FastForward)
    return forward.calls


def tiny_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=64)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def tiny_qwen3() -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=64)  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # per-head q/k norms that are not the identity
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


# What each kind of model compared with fast_decode is made with (beside the plain Llama).
KINDS: dict[str, list[dict[str, Any]]] = {
    "rtn-int4": [{"method": "rtn", "bits": 4, "group_size": 32}],
    "int8-activations": [{"method": "rtn", "bits": 4, "group_size": 32,
                          "decode_activations": "int8"}],
    "bf16": [{"method": "half", "dtype": "bfloat16"}]}


def reference_and_fast(kind: str, tiny_llama: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model of ``kind`` without and with fast_decode."""
    base = {"qwen2": tiny_qwen2, "qwen3": tiny_qwen3}.get(kind, lambda: tiny_llama)()
    steps = KINDS.get(kind, [])
    reference = sl.compress(base, {"steps": steps}).model if steps else base
    return reference, fast(base, *steps)


def step_logits(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill ``ids``, then one-token calls on ``tokens`` (the same ones for every model
    compared, so a near tie cannot send two models down different sequences), as ``generate``
    makes them: the cache under the forward's own argument name, the mask grown."""
    from transformers import DynamicCache

    from slimline.speculative.hf import cache_name

    name = cache_name(model) or "cache"
    cache = DynamicCache(config=model.config)  # type: ignore[union-attr]
    model(input_ids=ids, use_cache=True, **{name: cache})
    logits = []
    for token in tokens:
        mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)
        out = model(input_ids=token.view(1, 1), attention_mask=mask, use_cache=True,
                    **{name: cache})
        logits.append(out.logits[0, -1])
    return logits


def test_attend_one_is_softmax_attention_over_repeated_heads() -> None:
    g = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(6, 8, generator=g), torch.randn(2, 5, 8, generator=g),
                       torch.randn(2, 5, 8, generator=g))  # fmt: skip
    expected = []
    for h in range(6):  # query head h reads key/value head h // 3 (repeat_kv's layout)
        k, v = keys[h // 3], values[h // 3]
        w = torch.softmax(torch.stack([q[h] @ k[i] for i in range(5)]) / math.sqrt(8), dim=0)
        expected.append(sum(w[i] * v[i] for i in range(5)))
    out = attend_one(q, keys, values, 8**-0.5)
    torch.testing.assert_close(out, torch.cat(expected).view(1, -1))


def test_rotate_turns_each_pair_by_its_angle() -> None:
    x, angles = torch.randn(3, 8), torch.rand(4) * 6
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    z = torch.complex(x[:, :4], x[:, 4:]) * torch.polar(torch.ones(4), angles)  # pair (i, i+4)
    torch.testing.assert_close(rotate(x, cos, sin), torch.cat([z.real, z.imag], dim=-1))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "rtn-int4", "int8-activations",
                                  "bf16"])
def test_decode_steps_match_the_models_forward(kind: str, tiny_llama: nn.Module) -> None:
    reference, model = reference_and_fast(kind, tiny_llama)
    ids, tokens = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (6,))
    with torch.no_grad():
        expected, got = step_logits(reference, ids, tokens), step_logits(model, ids, tokens)
    assert calls(model) == 6
    # bf16: the modules and the written-out step round bf16 products in other orders;
    # int8 activations: a float32 difference in the last bit can move an activation's rounding.
    tol = {"bf16": 2e-2, "int8-activations": 1e-3}.get(kind, 1e-5)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol)


def chunk_logits(model: nn.Module, ids: torch.Tensor, chunks: list[torch.Tensor],
                 keep: int = 0) -> list[torch.Tensor]:
    """Prefill ``ids``, then calls of several tokens each (a speculative round's verification),
    the cache cropped back by one token after each (a rejected draft token), as
    ``slimline.speculative.hf.run`` makes them."""
    from transformers import DynamicCache

    from slimline.speculative.hf import cache_name, crop_cache

    name = cache_name(model) or "cache"
    cache = DynamicCache(config=model.config)  # type: ignore[union-attr]
    model(input_ids=ids, use_cache=True, **{name: cache})
    logits = []
    for chunk in chunks:
        out = model(input_ids=chunk.view(1, -1), use_cache=True, logits_to_keep=keep,
                    **{name: cache})
        logits.append(out.logits[0])
        crop_cache(cache, cache.get_seq_length() - 1)
    return logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "rtn-int4", "int8-activations",
                                  "bf16"])
def test_calls_of_several_tokens_match_the_models_forward(kind: str, tiny_llama: nn.Module
                                                          ) -> None:  # fmt: skip
    reference, model = reference_and_fast(kind, tiny_llama)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (1, 9), generator=g)
    chunks = [torch.randint(0, 128, (n,), generator=g) for n in (6, 2, 1, 16, 4)]
    tol = {"bf16": 2e-2, "int8-activations": 1e-3}.get(kind, 1e-5)
    for keep in (0, 3):
        with torch.no_grad():
            expected = chunk_logits(reference, ids, chunks, keep)
            got = chunk_logits(model, ids, chunks, keep)
        for e, o in zip(expected, got, strict=True):
            assert o.shape == e.shape
            torch.testing.assert_close(o.float(), e.float(), rtol=tol, atol=tol)
    assert calls(model) == 2 * len(chunks)
    with torch.no_grad():  # past MOST_TOKENS new tokens: the model's forward
        chunk_logits(model, ids, [torch.zeros(17, dtype=torch.long)])
    assert calls(model) == 2 * len(chunks)


def test_append_in_place_is_concatenation_and_never_rewrites_a_handed_out_tensor() -> None:
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(0)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)

    layer, book = DynamicLayer(), DynamicLayer()  # book: transformers' own concatenation
    first = kv(3)
    layer.update(*first)
    book.update(*first)
    handed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for step in range(150):  # past the first room (64 more): it is made anew, doubled
        if step == 40:  # the model's own forward appends a chunk of 3: concatenation
            chunk = kv(3)
            layer.update(*chunk)
            book.update(*chunk)
        if step == 90:  # a speculative rollback
            layer.crop(-2)
            book.crop(-2)
        k, v = kv(1)
        keys, values = append_in_place(layer, k, v)
        expected = book.update(k, v)
        assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
        assert layer.get_seq_length() == book.get_seq_length()
        handed.append((keys, values, keys.clone(), values.clone()))
    for keys, values, keys_then, values_then in handed:  # never written after handed out
        assert torch.equal(keys, keys_then) and torch.equal(values, values_then)


def test_greedy_generate_is_the_models_own_and_survives_save_and_load(
        tiny_llama: nn.Module, tmp_path) -> None:
    model = fast(tiny_llama)
    for n in (1, 5, 17):
        ids = torch.randint(0, 128, (1, n))
        expected = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                             do_sample=False, pad_token_id=0)  # fmt: skip
        assert torch.equal(got, expected)
    # every step after a prefill ran written out, and the one-token prompt's prefill too
    assert calls(model) == 3 * 9 + 1
    assert "forward" not in vars(tiny_llama)  # the input model is untouched
    sl.save(model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=copy.deepcopy(tiny_llama))
    ids = torch.randint(0, 128, (1, 6))
    expected = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0),
                       expected)
    assert calls(loaded) == 7


def test_other_calls_run_the_models_forward(tiny_llama: nn.Module) -> None:
    model = fast(tiny_llama)
    # a batch of two, left-padded: the model's forward, same output
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    expected = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)  # fmt: skip
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(got, expected) and calls(model) == 0
    # a static cache, hidden states asked for, gradients on: the model's forward
    one = ids[:1]
    model.generate(one, max_new_tokens=4, do_sample=False, pad_token_id=0,
                   cache_implementation="static")
    out = model(input_ids=one[:, :1], output_hidden_states=True)
    assert out.hidden_states is not None
    loss = model(input_ids=one[:, :1], labels=one[:, :1]).loss
    loss.backward()
    assert calls(model) == 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_deepcopy_points_the_copy_at_itself(tiny_llama: nn.Module) -> None:
    model = fast(tiny_llama)
    twin = copy.deepcopy(model)
    assert vars(twin)["forward"].model is twin
    ids = torch.randint(0, 128, (1, 4))
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(twin.generate(ids, **greedy), model.generate(ids, **greedy))
    assert calls(twin) == 3 and calls(model) == 3


def test_with_a_quantized_kv_cache_and_self_speculation(tiny_llama: nn.Module,
                                                         token_batches) -> None:
    cached = sl.compress(tiny_llama, {"steps": [{"method": "kv_cache", "bits": 8}]}).model
    model = fast(tiny_llama, {"method": "kv_cache", "bits": 8})
    ids = torch.randint(0, 128, (1, 7))
    greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), cached.generate(ids, **greedy))
    assert calls(model) == 9
    drafted = fast(tiny_llama, {"method": "speculative", "mode": "self", "skip_layers": [1]})
    assert torch.equal(drafted.generate(ids, **greedy), tiny_llama.generate(ids, **greedy))
    assert calls(drafted) > 0  # the self-draft's one-token steps, its skipped block passed


def test_prompt_lookup_verifies_its_drafts_written_out(tiny_llama: nn.Module,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from slimline.compile import fast_decode

    sizes: list[int] = []
    real = fast_decode.decode_step

    def counted(model: nn.Module, token: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(token.shape[-1])
        return real(model, token, *args, **kwargs)

    monkeypatch.setattr(fast_decode, "decode_step", counted)
    model = fast(tiny_llama, {"method": "speculative", "mode": "prompt_lookup", "gamma": 4})
    ids = torch.arange(1, 9).repeat(3)[None]  # a context that repeats: drafts to verify
    greedy = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), tiny_llama.generate(ids, **greedy))
    assert max(sizes) > 1  # a draft verified in one written-out call


def test_refused_before_anything_changes(tiny_gpt2: nn.Module, tiny_llama: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(fast_decode\): GPT2LMHeadModel \(model_type 'gpt2'\)"):
        fast(tiny_gpt2)
    assert "forward" not in vars(tiny_gpt2)
    with pytest.raises(ValueError, match="fast_decode.targets"):
        sl.Recipe.from_dict({"steps": [{"method": "fast_decode",
                                        "targets": {"include": ["*"]}}]})
    with pytest.raises(ValueError, match="compil"):
        sl.Recipe.from_dict({"steps": [{"method": "fast_decode"}, {"method": "compile"}]})
    tiny_llama.forward = lambda *a, **k: None  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="forward is already replaced"):
        fast(tiny_llama)


def test_the_cache_under_its_old_name_runs_written_out(tiny_llama: nn.Module) -> None:
    from transformers import DynamicCache

    model = fast(tiny_llama)
    ids, tokens = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (3,))
    with torch.no_grad():
        expected = step_logits(tiny_llama, ids, tokens)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        got = [model(input_ids=t.view(1, 1), past_key_values=cache).logits[0, -1] for t in tokens]
    assert calls(model) == 3
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_float_activations_are_noted_with_the_int8_fix(tiny_llama: nn.Module) -> None:
    """Packed layers left on float32 decode activations get a note naming the faster
    arithmetic, where this CPU has the int8-activation kernel; int8 ones and float models none."""
    from slimline.quantize import kernels_gemv

    def notes(*steps: dict[str, Any]) -> list[str]:
        recipe = {"steps": [*steps, {"method": "fast_decode"}]}
        return sl.compress(tiny_llama, recipe).steps[-1].notes

    has_a8 = not kernels_gemv.library_problem() and bool(kernels_gemv._library().isa)
    float_notes = [n for n in notes(*KINDS["rtn-int4"]) if "decode_activations: int8" in n]
    assert len(float_notes) == has_a8
    if has_a8:  # seven projections a block, two blocks
        assert float_notes[0].startswith("14 packed layers decode on exact float32 activations")
    for kind in ("int8-activations", "bf16"):
        assert not [n for n in notes(*KINDS[kind]) if "decode_activations: int8" in n], kind
