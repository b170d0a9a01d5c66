"""The KV quantization maths against the textbook formulas, computed here in float64."""

from __future__ import annotations

import pytest
import torch

from slimline.cache.kv_quant import dequantize_kv, nbytes, pack_int4, quantize_kv, unpack_int4


def _reference(
    x: torch.Tensor, bits: int, axis: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the 2^bits-level grid, in float64: x̂, each element's step, and
    where x sits on a rounding tie (x / step half-way between codes: either code is nearest)."""
    x = x.double()
    levels, half = 2**bits - 1, 2 ** (bits - 1)
    if symmetric:
        step = 2 * x.abs().amax(dim=axis, keepdim=True) / levels
        t = x / step
        approx = torch.clamp(torch.round(t), -half, half - 1) * step
    else:
        lo, hi = x.amin(dim=axis, keepdim=True), x.amax(dim=axis, keepdim=True)
        step = (hi - lo) / levels
        t = (x - lo) / step
        approx = torch.round(t) * step + lo
    tie = ((t - t.floor()) - 0.5).abs() < 1e-4
    return approx, step.expand_as(x), tie


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference_and_error_is_at_most_half_a_step(bits: int, axis: int, symmetric: bool) -> None:
    # keys-like states with a few large channels, as in KIVI's Fig. 2
    x = torch.randn(2, 3, 20, 16) * torch.tensor([1.0] * 14 + [8.0, 20.0])
    q = quantize_kv(x, bits, axis, symmetric=symmetric)
    approx = dequantize_kv(q, bits).double()
    expected, step, tie = _reference(x, bits, axis, symmetric)
    if symmetric:  # max|x| always sits half-way between the two outermost codes
        assert bool(((expected - x.double()).abs()[tie] >= step[tie] / 2 * (1 - 1e-4)).all())
    slack = 1e-6 * float(x.abs().max())  # float32 rounding, against the float64 reference
    torch.testing.assert_close(approx[~tie], expected[~tie], rtol=0, atol=slack)
    assert bool(((x.double() - approx).abs() <= step / 2 + slack).all())
    torch.testing.assert_close(q.scale.expand_as(x).double(), step, rtol=1e-6, atol=0)


def test_codes_are_one_byte_or_half_a_byte() -> None:
    x = torch.randn(2, 2, 5, 8)
    q8 = quantize_kv(x, 8, -1, symmetric=True)
    assert q8.codes.dtype == torch.int8 and q8.codes.shape == x.shape and q8.offset is None
    assert int(q8.codes.min()) >= -128 and int(q8.codes.max()) <= 127
    q4 = quantize_kv(x, 4, -1, symmetric=False)
    assert q4.codes.dtype == torch.int8 and q4.codes.shape == (2, 2, 5, 4)
    assert q4.scale.shape == q4.offset.shape == (2, 2, 5, 1)  # type: ignore[union-attr]
    assert nbytes(q4) == 2 * 2 * 5 * 4 + 2 * (2 * 2 * 5 * 4)  # codes + float32 scale and offset


def test_int4_packing_round_trips_every_code() -> None:
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(codes)
    assert packed.shape == (3, 16) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), codes)
    # code j in the low nibble, code j + D/2 in the high one, two's complement:
    # (-8, 7) -> 0x8 | 0x70 = 0x78; (7, -8) -> 0x7 | 0x80 = 0x87 (-121 as int8)
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).view(torch.uint8).item() == 0x78
    assert pack_int4(torch.tensor([7, -8], dtype=torch.int8)).view(torch.uint8).item() == 0x87
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))


@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_and_zero_slices_are_exact(symmetric: bool) -> None:
    x = torch.zeros(1, 1, 3, 8)
    x[0, 0, 1] = 2.5  # a constant token
    q = quantize_kv(x, 8, -1, symmetric=symmetric)
    out = dequantize_kv(q, 8)
    assert torch.isfinite(out).all()
    if symmetric:
        assert torch.equal(out[0, 0, 0], x[0, 0, 0])  # zeros stay zeros
    else:
        assert torch.equal(out, x)  # a constant slice is its own offset


def test_unsupported_bits_raise() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(torch.randn(2, 4), 3, -1, symmetric=True)
