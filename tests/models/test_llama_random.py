"""``llama-1b-random``: TinyLlama-1.1B's shapes, seeded random weights, random token batches."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from slimline.models import load_builtin
from slimline.models.llama_random import SHAPES, LlamaShape, build_llama_random


def test_full_shape_is_tinyllama_1_1b() -> None:
    config = SHAPES["full"].llama_config()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 5632, 22)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 4)
    assert (config.vocab_size, config.max_position_embeddings) == (32000, 2048)
    assert config.rope_parameters["rope_theta"] == 10000.0 and not config.tie_word_embeddings
    with torch.device("meta"):  # counted without allocating 4.4 GB
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert params == 1_100_048_384  # TinyLlama-1.1B's published count


def test_weights_are_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_llama_random(SHAPES["small"])
    assert torch.equal(torch.rand(3), expected)
    second = build_llama_random(SHAPES["small"])
    other = build_llama_random(SHAPES["small"], seed=1)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(),
                               other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        if name.endswith("proj.weight"):
            assert not torch.equal(a, c) and abs(float(a.std()) - 0.02) < 2e-3, name
        if name.endswith("norm.weight"):
            assert bool((a == 1).all()), name


def test_same_logits_as_a_normally_built_model_with_these_weights() -> None:
    built = build_llama_random(SHAPES["small"])
    reference = LlamaForCausalLM(SHAPES["small"].llama_config()).eval()  # rotary built normally
    reference.load_state_dict(built.state_dict())
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(built(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_builtin_has_no_tokenizer_and_random_token_batches() -> None:
    built = load_builtin("llama-1b-random", size="small")
    assert built.tokenizer is None and built.task == "causal-lm"
    batches = built.batches("test", batch_size=4, limit=2)
    assert [b["input_ids"].shape for b in batches] == [(4, 128), (4, 128)]
    ids = batches[0]["input_ids"]
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 512
    assert torch.equal(ids, built.batches("train", batch_size=4, limit=1)[0]["input_ids"])
    with torch.no_grad():
        assert bool(built.model(**batches[0]).logits.isfinite().all())


@pytest.mark.parametrize(("field", "value"), [("num_layers", 0), ("num_kv_heads", 3), ("hidden_size", 2048.0), ("rope_theta", -1.0)])
def test_bad_shape_raises_naming_it(field: str, value: float) -> None:
    with pytest.raises(ValueError, match="llama-1b-random"):
        LlamaShape(**{field: value})
