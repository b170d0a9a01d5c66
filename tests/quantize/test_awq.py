from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.quantize.awq import (
    AwqConfig,
    awq_clip,
    awq_search_scale,
    clip_weight,
    fake_quantize,
    fold_groups,
    fold_scale,
)


def _outlier_problem(out: int = 48, inp: int = 64, tokens: int = 512):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, inp, generator=g)
    x[:, [3, 17, inp - 9]] *= 30.0  # a few outlier input channels, as in LLM activations
    w = torch.randn(out, inp, generator=g)
    return w, x


def _err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ (w - wq).t()).pow(2).mean())


@pytest.mark.parametrize(("bits", "group_size"), [(3, 16), (3, 32), (4, 16), (4, 32)])
def test_awq_beats_rtn_on_outlier_channels(bits: int, group_size: int) -> None:
    w, x = _outlier_problem()
    cfg = AwqConfig(bits=bits, group_size=group_size)
    s = awq_search_scale([w], x, x.abs().mean(0), cfg)
    ws = w * s  # the layer after folding: reads x / s
    wq = fake_quantize(clip_weight(ws, awq_clip(ws, x / s, cfg), group_size), cfg) / s
    rtn = _err(x, w, fake_quantize(w, cfg))
    awq = _err(x, w, wq)
    assert awq < 0.8 * rtn, (awq, rtn)


def test_clip_matches_brute_force_per_group() -> None:
    w, x = _outlier_problem(out=4, inp=32, tokens=64)
    cfg = AwqConfig(bits=3, group_size=16, clip_grid=5, max_shrink=0.4)
    best = awq_clip(w, x, cfg)  # (4, 2)
    for n in range(4):
        for g in range(2):
            cols = slice(16 * g, 16 * (g + 1))
            errs = []
            for f in (1.0, 0.9, 0.8, 0.7, 0.6):
                m = w[n, cols].abs().max() * f
                wc = w[n:n + 1, cols].clamp(-m, m)
                errs.append((_err(x[:, cols], w[n:n + 1, cols], fake_quantize(wc, cfg)), float(m)))
            torch.testing.assert_close(best[n, g].item(), min(errs)[1], rtol=1e-5, atol=0)


def _scale_all(model: torch.nn.Module) -> list[str]:
    """Fold a random positive scale into every group found, with no quantization."""
    g = torch.Generator().manual_seed(7)
    folded = []
    for block in model.model.layers if hasattr(model, "model") else model.encoder.layer:
        rules, _ = fold_groups(block)
        for rule in rules:
            layer = block.get_submodule(rule.layers[0])
            k = layer.weight.shape[1]
            s = torch.rand(k, generator=g) * 3 + 0.2
            fold_scale(block.get_submodule(rule.prev), [block.get_submodule(n) for n in rule.layers], s)
            folded.append(rule.prev)
    return folded


def test_folding_is_exact_on_llama(tiny_llama, token_batches) -> None:
    with torch.no_grad():
        ref = tiny_llama(**token_batches[0]).logits
        folded = _scale_all(tiny_llama)
        out = tiny_llama(**token_batches[0]).logits
    # GQA (2 kv heads, 4 heads): v_proj → o_proj shapes differ, so it is not folded
    assert folded == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"] * 2
    _, skipped = fold_groups(tiny_llama.model.layers[0])
    assert any("self_attn.v_proj → self_attn.o_proj" in line for line in skipped)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_folding_v_to_o_without_gqa(token_batches) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4)).eval()
    with torch.no_grad():
        ref = model(**token_batches[0]).logits
        assert "self_attn.v_proj" in _scale_all(model)
        torch.testing.assert_close(model(**token_batches[0]).logits, ref, rtol=0, atol=1e-5)


def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def test_folding_is_exact_on_bert(token_batches) -> None:
    model = _tiny_bert()
    with torch.no_grad():
        ref = model(**token_batches[0]).last_hidden_state
        assert _scale_all(model) == ["attention.self.value"] * 2
        out = model(**token_batches[0]).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        # Why BERT's LayerNorms are not used: post-LN, their output is also the residual, so
        # scaling attention.output.LayerNorm by 1/s (and intermediate.dense by s) is not exact.
        block = model.encoder.layer[0]
        s = torch.rand(64) * 3 + 0.2
        fold_scale(block.attention.output.LayerNorm, [block.intermediate.dense], s)
        assert (model(**token_batches[0]).last_hidden_state - ref).abs().max() > 1e-2


def _kl(ref: torch.nn.Module, model: torch.nn.Module, batch) -> float:
    with torch.no_grad():
        p = ref(**batch).logits.log_softmax(-1)
        q = model(**batch).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_awq_on_llama_beats_rtn_and_round_trips(tmp_path, tiny_llama, token_batches) -> None:
    spec = {"bits": 3, "group_size": 32}
    with pytest.raises(ValueError, match="awq"):
        sl.compress(tiny_llama, {"steps": [{"method": "awq", **spec}]})
    rtn = sl.compress(tiny_llama, {"steps": [{"method": "rtn", **spec}]}).model
    result = sl.compress(tiny_llama, {"steps": [{"method": "awq", **spec}]}, calibration=token_batches)
    assert len(result.steps[0].modules) == 14
    assert any("v_proj → self_attn.o_proj" in n for n in result.steps[0].notes)
    kl_awq, kl_rtn = _kl(tiny_llama, result.model, token_batches[0]), _kl(tiny_llama, rtn, token_batches[0])
    assert kl_awq < kl_rtn, (kl_awq, kl_rtn)
    sl.save(result.model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**token_batches[0]).logits,
                                   result.model(**token_batches[0]).logits, rtol=0, atol=0)


def test_awq_without_blocks_clips_only(tiny_mlp) -> None:
    batches = [torch.randn(8, 32) for _ in range(2)]
    result = sl.compress(tiny_mlp, {"steps": [{"method": "awq", "bits": 4, "group_size": 16}]},
                         calibration=batches)
    assert result.steps[0].modules == ["fc1", "fc2"]
    assert any("RTN + clipping only" in n for n in result.steps[0].notes)
    with torch.no_grad():
        assert torch.isfinite(result.model(batches[0])).all()


@pytest.mark.parametrize(("field", "value"), [
    ("bits", 9), ("group_size", 0), ("grid", 0), ("clip_grid", 0), ("max_shrink", 1.0),
    ("max_shrink", -0.1), ("max_tokens", 0),
])
def test_invalid_fields(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"awq.{field}"):
        sl.Recipe.from_dict({"steps": [{"method": "awq", field: value}]})


def test_awq_has_the_grid_fields_only_and_reads_recipes_saved_with_mixed_fields() -> None:
    assert {"bits", "group_size", "symmetric"} <= set(AwqConfig.field_names())
    assert not {"average_bits", "bit_choices"} & set(AwqConfig.field_names())
    # what AwqConfig.to_dict wrote while it inherited rtn's mixed-precision fields
    legacy = {**AwqConfig(bits=3, grid=5).to_dict(), "average_bits": None, "bit_choices": [3, 4]}
    assert AwqConfig.from_dict(legacy) == AwqConfig(bits=3, grid=5)
    with pytest.raises(ValueError, match="unknown field"):
        AwqConfig.from_dict({"average_bits": 3.5})
    with pytest.raises(ValueError, match="unknown field"):
        AwqConfig.from_dict({"bit_choices": [3, 4]})
