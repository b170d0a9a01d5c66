"""The quantized cache layer against a float64 re-computation of what it should hold."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from slimline.cache.hf.quantized_cache import (
    KVQuantSpec,
    QuantizedKVCache,
    QuantizedKVLayer,
    cache_nbytes,
)
from slimline.cache.kv_quant import dequantize_kv, quantize_kv

B, H, D = 2, 3, 8


def _fake_quant(x: torch.Tensor, bits: int, symmetric: bool, group: int | None) -> torch.Tensor:
    """x (B, H, T, D) rounded per token over D, or per channel over consecutive groups of
    ``group`` tokens, with the maths that tests/cache/test_kv_quant.py checks against the
    textbook formula: what is tested here is which tokens are rounded, in which groups."""
    if group is not None:
        b, h, t, d = x.shape
        grouped = x.reshape(b, h, t // group, group, d)
        q = quantize_kv(grouped, bits, -2, symmetric=symmetric)
        return dequantize_kv(q, bits).reshape(x.shape)
    return dequantize_kv(quantize_kv(x, bits, -1, symmetric=symmetric), bits)


def _expected_past(x: torch.Tensor, spec: KVQuantSpec, keys: bool) -> torch.Tensor:
    """What the layer should return for the cached past ``x`` (B, H, T, D)."""
    t, r = x.shape[2], spec.residual_length
    if keys and spec.key_axis == "channel":
        n = t // r * r  # whole groups quantized, the rest still in the window
        group: int | None = r
    else:
        n, group = max(t - r, 0), None
    quantized = _fake_quant(x[:, :, :n], spec.bits, spec.symmetric, group)
    return torch.cat([quantized, x[:, :, n:]], dim=2)


SPECS = [
    KVQuantSpec(bits=8),
    KVQuantSpec(bits=8, symmetric=False, residual_length=3),
    KVQuantSpec(bits=4, key_axis="channel", residual_length=4),
    KVQuantSpec(bits=4, key_axis="channel", residual_length=4, symmetric=False),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_update_returns_dequantized_past_and_exact_new_states(spec: KVQuantSpec) -> None:
    layer = QuantizedKVLayer(spec)
    keys, values = torch.empty(B, H, 0, D), torch.empty(B, H, 0, D)
    for step, t in enumerate([7, 1, 1, 2, 1, 5, 1, 1]):  # a prefill, then decoding
        k, v = torch.randn(B, H, t, D) * (1 + step), torch.randn(B, H, t, D)
        out_k, out_v = layer.update(k, v)
        past = keys.shape[2]
        assert torch.equal(out_k[:, :, :past], _expected_past(keys, spec, keys=True))
        assert torch.equal(out_v[:, :, :past], _expected_past(values, spec, keys=False))
        assert torch.equal(out_k[:, :, past:], k) and torch.equal(out_v[:, :, past:], v)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        assert layer.get_seq_length() == keys.shape[2]
    full_k, full_v = layer.full_states()
    assert torch.equal(full_k, _expected_past(keys, spec, keys=True))
    assert torch.equal(full_v, _expected_past(values, spec, keys=False))


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True)])
def test_stored_bytes_are_codes_plus_scales(bits: int, symmetric: bool) -> None:
    """After T tokens: T·D codes of ``bits`` bits per head, plus 1 or 2 float32 per token."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    quantized = QuantizedKVCache(config, KVQuantSpec(bits=bits, symmetric=symmetric))
    reference = DynamicCache(config=config)
    t, d, heads = 40, 16, 2
    for layer_idx in range(2):
        k, v = torch.randn(B, heads, t, d), torch.randn(B, heads, t, d)
        quantized.update(k, v, layer_idx)
        reference.update(k, v, layer_idx)
    stored = [layer.stored() for layer in quantized.layers]
    assert all(s["keys_codes"].dtype == s["values_codes"].dtype == torch.int8 for s in stored)
    assert all(s["keys_codes"].shape[-1] == d * bits // 8 for s in stored)
    assert all(s["keys_window"].shape[2] == 0 for s in stored)  # residual_length 0
    actual = sum(x.numel() * x.element_size() for s in stored for x in s.values())
    floats_per_token = 1 if symmetric else 2
    per_layer = 2 * B * heads * t * (d * bits // 8 + 4 * floats_per_token)
    assert actual == cache_nbytes(quantized) == 2 * per_layer
    fp32 = cache_nbytes(reference)
    assert fp32 == 2 * 2 * B * heads * t * d * 4
    # 8-bit symmetric at D = 16: (16 + 4) / 64 = 0.3125 of float32
    assert actual / fp32 == pytest.approx((d * bits / 8 + 4 * floats_per_token) / (4 * d))


def test_cache_replaces_only_full_attention_layers() -> None:
    config = LlamaConfig(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "full_attention"],
                         sliding_window=8)
    cache = QuantizedKVCache(config, KVQuantSpec())
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["QuantizedKVLayer", "DynamicSlidingWindowLayer", "QuantizedKVLayer"]
    assert cache.quantized_layers == 2 and isinstance(cache, DynamicCache)
    assert not isinstance(cache.layers[1], QuantizedKVLayer) and isinstance(cache.layers[0], DynamicLayer)


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
def test_batch_reorder_moves_codes_without_requantizing(spec: KVQuantSpec) -> None:
    layer = QuantizedKVLayer(spec)
    for t in (9, 1, 1):
        layer.update(torch.randn(3, H, t, D), torch.randn(3, H, t, D))
    before = layer.full_states()
    order = torch.tensor([2, 0, 0])
    layer.reorder_cache(order)  # type: ignore[arg-type]
    after = layer.full_states()
    assert torch.equal(after[0], before[0][order]) and torch.equal(after[1], before[1][order])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.full_states()[0], before[0][[0]])


@pytest.mark.parametrize("spec", SPECS[1:3], ids=str)
@pytest.mark.parametrize("remove", [1, 3, 6])
def test_crop_drops_the_last_tokens(spec: KVQuantSpec, remove: int) -> None:
    layer = QuantizedKVLayer(spec)
    for t in (10, 1, 1):
        layer.update(torch.randn(B, H, t, D), torch.randn(B, H, t, D))
    keys, values = layer.full_states()
    layer.crop(-remove)
    assert layer.get_seq_length() == 12 - remove
    k, v = layer.full_states()
    assert torch.equal(k, keys[:, :, : 12 - remove]) and torch.equal(v, values[:, :, : 12 - remove])
    # decoding goes on after a crop; kept tokens move at most one step of the widest grid
    # (those back in the window are rounded again when their group is complete)
    for _ in range(3):
        out_k, _ = layer.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    assert out_k.shape[2] == layer.get_seq_length() == 15 - remove
    step = 2 * float(keys.abs().max()) / (2**spec.bits - 1)
    torch.testing.assert_close(out_k[:, :, : 12 - remove], k, rtol=0, atol=step)


def test_bad_spec_raises() -> None:
    with pytest.raises(ValueError, match="bits"):
        KVQuantSpec(bits=2)
    with pytest.raises(ValueError, match="residual_length"):
        KVQuantSpec(residual_length=-1)
    with pytest.raises(ValueError, match="channel"):
        KVQuantSpec(key_axis="channel", residual_length=0)
