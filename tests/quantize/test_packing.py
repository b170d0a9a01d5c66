"""Group quantization and bit packing against brute-force references."""

from __future__ import annotations

import pytest
import torch

from slimline.quantize.packing import (
    dequantize,
    from_groups,
    num_groups,
    pack,
    packed_numel,
    quantize_groups,
    quantize_per_channel_int8,
    to_groups,
    unpack,
)


def _reference_groups(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Textbook RTN, one group at a time (the last group is whatever is left)."""
    n, k = w.shape
    levels = 2**bits - 1
    q = torch.zeros(n, k)
    scales = torch.zeros(n, -(-k // group))
    zeros = torch.zeros_like(scales)
    for row in range(n):
        for g, start in enumerate(range(0, k, group)):
            chunk = w[row, start : start + group]
            if symmetric:
                scale = 2.0 * chunk.abs().max() / levels
            else:
                lo, hi = chunk.min().clamp(max=0.0), chunk.max().clamp(min=0.0)
                scale = (hi - lo) / levels
            scale = scale if scale > 0 else torch.tensor(1.0)
            if symmetric:
                half = 2 ** (bits - 1)
                codes = torch.clamp(torch.round(chunk / scale), -half, half - 1)
            else:
                zeros[row, g] = torch.clamp(torch.round(-lo / scale), 0, levels)
                codes = torch.clamp(torch.round(chunk / scale) + zeros[row, g], 0, levels)
            q[row, start : start + group] = codes
            scales[row, g] = scale
    return q, scales, zeros


@pytest.mark.parametrize(("k", "group"), [(12, 4), (13, 4), (5, 8), (7, 1), (9, 9)])
@pytest.mark.parametrize("pad", ["zero", "edge"])
def test_to_groups_matches_element_loop(k: int, group: int, pad: str) -> None:
    t = torch.randn(3, k)
    grouped = to_groups(t, group, pad=pad)  # type: ignore[arg-type]
    expect = torch.empty(3, -(-k // group), group)
    for r in range(3):
        for g in range(expect.shape[1]):
            for c in range(group):
                col = g * group + c
                if col < k:
                    expect[r, g, c] = t[r, col]
                else:  # padding of the ragged last group
                    expect[r, g, c] = 0.0 if pad == "zero" else t[r, k - 1]
    torch.testing.assert_close(grouped, expect, rtol=0, atol=0)
    torch.testing.assert_close(from_groups(grouped, k), t, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [128, 64, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_groups_matches_per_group_loop(bits: int, group_size, symmetric: bool) -> None:
    w = torch.randn(6, 200)  # 200 = 128 + 72: a ragged last group
    w[0, :128] = 0.0  # an all-zero group
    q, scales, zeros = quantize_groups(w, bits, group_size, symmetric, scale_dtype=torch.float32)
    ref_q, ref_s, ref_z = _reference_groups(w, bits, group_size or 200, symmetric)
    assert scales.shape == (6, num_groups(200, group_size))
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    torch.testing.assert_close(scales, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(q.float(), ref_q, rtol=0, atol=0)
    if symmetric:
        assert zeros is None
    else:
        assert zeros is not None
        torch.testing.assert_close(zeros.float(), ref_z, rtol=0, atol=0)
    # dequantize against the same loop
    group = group_size or 200
    expect = torch.empty_like(w)
    for g, start in enumerate(range(0, 200, group)):
        z = 0.0 if symmetric else ref_z[:, g : g + 1]
        expect[:, start : start + group] = (ref_q[:, start : start + group] - z) * ref_s[
            :, g : g + 1
        ]
    torch.testing.assert_close(dequantize(q, scales, zeros, group_size), expect)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_error_is_at_most_half_a_step_and_zeros_stay_zero(symmetric: bool) -> None:
    w = torch.randn(8, 200) * torch.rand(8, 1)
    w[:, ::7] = 0.0  # pruned weights
    q, scales, zeros = quantize_groups(w, 4, 128, symmetric)
    assert scales.dtype == torch.float16  # normal fp16 scales: stored in half the bytes
    deq = dequantize(q, scales, zeros, 128)
    step = torch.cat([scales[:, :1].expand(8, 128), scales[:, 1:].expand(8, 72)], 1).float()
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (deq[:, ::7] == 0).all()


def test_scales_stay_float32_where_float16_would_underflow() -> None:
    w = torch.randn(4, 64) * 1e-7
    _, scales, _ = quantize_groups(w, 4, 32, True)
    assert scales.dtype == torch.float32


def _reference_pack(values: list[int], bits: int) -> list[int]:
    """The little-endian bit stream, one bit at a time."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (bits * i)
    n_bytes = -(-len(values) * bits // 8)
    return [(stream >> (8 * j)) & 0xFF for j in range(n_bytes)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 13, 1000])
def test_pack_unpack_round_trip_and_layout(bits: int, numel: int) -> None:
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(numel, bits) == -(-numel * bits // 8)
    assert packed.tolist() == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack(packed, bits, (numel,)), codes)


def test_pack_density() -> None:
    codes = torch.zeros(256, 1024, dtype=torch.uint8)
    assert pack(codes, 4).numel() == 256 * 1024 // 2  # two per byte
    assert pack(codes, 2).numel() == 256 * 1024 // 4  # four per byte
    assert pack(codes, 3).numel() == 256 * 1024 * 3 // 8  # eight in three bytes
    assert torch.equal(unpack(pack(codes, 3), 3, (256, 1024)), codes)


def test_quantize_per_channel_int8() -> None:
    w = torch.randn(16, 40)
    q, scale = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and q.min() >= -127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [1, 9])
def test_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_groups(torch.randn(2, 8), bits, None, True)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
