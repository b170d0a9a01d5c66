"""Group-wise round-to-nearest quantization and dense bit packing: pure tensor maths.

Round-to-nearest (RTN) is the baseline every weight quantizer is measured against (GPTQ,
arXiv 2210.17323, §5; Dettmers & Zettlemoyer, "The case for 4-bit precision", arXiv
2212.09720): each group of ``group_size`` consecutive input weights of a row gets its own
scale, and every weight is rounded to the nearest point of the grid.

Conventions, shared by every quantized layer of slimline:

* weights are ``(N, K)`` = (out_features, in_features); groups run along ``K``; a width that
  is not a multiple of ``group_size`` gets a smaller last group (``G = ceil(K / group_size)``);
* **symmetric**: signed codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` (int8), ``w ≈ q · s`` with
  ``s = 2·max|w| / (2^b - 1)`` — GPTQ's reference grid, which uses all ``2^b`` levels (the
  ``max|w| / (2^(b-1) - 1)`` grid wastes one, a third of the levels at 2 bits);
* **asymmetric**: unsigned codes ``q`` in ``[0, 2^b - 1]`` (uint8) and an integer zero point
  ``z`` per group, ``w ≈ (q - z) · s`` with ``s = (max - min) / (2^b - 1)``; the range always
  contains 0, so pruned (zero) weights stay exactly zero after quantization, with either grid;
* scales are stored in float16 when every scale is a normal float16 number (half the bytes,
  relative rounding ≤ 2^-10, well under the rounding error of an 8-bit grid), else float32;
  they are rounded up, never down, and codes are computed with the stored scale, so the
  error of every weight is at most half a step of the grid as stored;
* packing stores unsigned codes in ``[0, 2^b)`` — a symmetric layer stores ``q + 2^(b-1)``,
  i.e. offset binary with the implicit zero point ``2^(b-1)`` — as a dense little-endian bit
  stream: value ``i`` takes bits ``[b·i, b·(i+1))``, so int4 is two values per byte (low
  nibble first), int2 four, and int3 eight values in three bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

MIN_BITS = 2
MAX_BITS = 8
# The smallest positive normal float16 and its largest finite value: scales outside stay fp32.
_FP16_TINY = 2.0**-14
_FP16_MAX = 65504.0


class QuantizedWeight(NamedTuple):
    """A weight on a group grid (unpacks as ``q, scales, zeros``): what :func:`quantize_groups`,
    GPTQ and HQQ return and :meth:`QuantLinear.from_codes` stores."""

    q: torch.Tensor  # (N, K) int8 codes (symmetric) or uint8 codes (asymmetric)
    scales: torch.Tensor  # (N, G) float16 or float32
    zeros: torch.Tensor | None  # (N, G) uint8 zero points; None when symmetric


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is a supported code width (2 to 8)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")


def effective_group(in_features: int, group_size: int | None) -> int:
    """The group length along ``K``: ``group_size``, or the whole row when None/larger."""
    if group_size is None:
        return in_features
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size}")
    return min(group_size, in_features)


def num_groups(in_features: int, group_size: int | None) -> int:
    """``G = ceil(K / group)``; the last group is smaller when ``K`` is not a multiple."""
    group = effective_group(in_features, group_size)
    return -(-in_features // group)


def compact_scale_dtype(scales: torch.Tensor) -> torch.dtype:
    """float16 when every scale is a normal float16 number, float32 otherwise."""
    fits = bool(((scales >= _FP16_TINY) & (scales <= _FP16_MAX)).all())
    return torch.float16 if fits else torch.float32


def _round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, rounded up where the cast rounded down.

    A scale never smaller than the exact one keeps every weight inside the grid, so the
    rounding error stays at most half a step even at the clipped ends.
    """
    cast = values.to(dtype)
    low = cast.float() < values
    return torch.where(low, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)


def to_groups(
    values: torch.Tensor, group: int, *, pad: Literal["zero", "edge"] = "zero"
) -> torch.Tensor:
    """(R, K) -> (R, G, group), ``G = ceil(K / group)``: the one grouping of slimline.

    The ragged last group is padded with zeros, or with ``pad="edge"`` by repeating its last
    column: a value already in the group leaves its min, max and max|w| unchanged, so the
    padded group gets exactly the scale it would get on its own. Zeros suit sums (a padded
    activation adds nothing) and masks (``to_groups(ones(1, K), g)`` marks the real columns).
    """
    rows, k = values.shape
    extra = -k % group
    if extra:
        edge = pad == "edge"
        fill = values[:, -1:].expand(rows, extra) if edge else values.new_zeros(rows, extra)
        values = torch.cat([values, fill], dim=1)
    return values.reshape(rows, -1, group)


def from_groups(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """(R, G, group) -> (R, K): the inverse of :func:`to_groups`, padding cut off."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def expand_groups(per_group: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """(N, G) -> (N, K): each group's value repeated over its columns (last group cut)."""
    return per_group.repeat_interleave(group, dim=1)[:, :in_features]


def quantize_groups(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    *,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` (N, K) in groups along K.

    ``scale_dtype`` None picks :func:`compact_scale_dtype`. Returns codes (N, K), scales
    (N, G) and zero points (N, G) or None; see the module docstring for the grids.
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    group = effective_group(k, group_size)
    w = to_groups(weight.detach().float(), group, pad="edge")  # (N, G, group)
    levels = 2**bits - 1
    if symmetric:
        scales = 2.0 * w.abs().amax(dim=-1) / levels  # (N, G)
    else:
        lo = w.amin(dim=-1).clamp(max=0.0)  # the range contains 0: zeros stay zeros
        scales = (w.amax(dim=-1).clamp(min=0.0) - lo) / levels
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero groups
    stored = _round_up(scales, scale_dtype or compact_scale_dtype(scales))
    s = stored.float().unsqueeze(-1)  # (N, G, 1): the value dequantization will use
    if symmetric:
        half = 2 ** (bits - 1)
        q = torch.clamp(torch.round(w / s), -half, half - 1).to(torch.int8)
        return QuantizedWeight(from_groups(q, k).contiguous(), stored, None)
    zeros = torch.clamp(torch.round(-lo / s.squeeze(-1)), 0, levels)  # (N, G)
    q = torch.clamp(torch.round(w / s) + zeros.unsqueeze(-1), 0, levels).to(torch.uint8)
    return QuantizedWeight(from_groups(q, k).contiguous(), stored, zeros.to(torch.uint8))


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int | None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) weight in ``dtype`` from codes, scales (N, G) and zero points (N, G) or None.

    ``q · s`` when ``zeros`` is None (signed symmetric codes), else ``(q - z) · s``. The zero
    point is removed in integers (exact: a code equal to its zero point gives exactly 0), then
    one multiply by the group's scale.
    """
    if zeros is not None:
        q = centre(q, zeros, group_size, torch.int16)
    k = q.shape[1]
    group = effective_group(k, group_size)
    s = scales.to(dtype)  # (N, G)
    codes = q.to(dtype)  # (N, K)
    if k % group == 0:
        return from_groups(to_groups(codes, group) * s.unsqueeze(-1), k)  # (N, G, group)
    return codes * expand_groups(s, k, group)  # ragged last group


def centre(
    q: torch.Tensor, zeros: torch.Tensor, group_size: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """(N, K) ``q - z`` in the signed integer ``dtype`` (int8 suffices while codes < 128)."""
    k = q.shape[1]
    z = expand_groups(zeros.to(dtype), k, effective_group(k, group_size))  # (N, K)
    return q.to(dtype) - z


def packed_numel(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` values of ``bits`` bits each."""
    return -(-numel * bits // 8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in ``[0, 2^bits)``, any shape -> 1-D uint8 dense little-endian stream."""
    check_bits(bits)
    codes = q.reshape(-1).to(torch.int16) & (2**bits - 1)  # (numel,)
    numel = codes.numel()
    if 8 % bits == 0:  # 2, 4, 8 bits: whole values per byte
        per_byte = 8 // bits
        codes = _pad_to(codes, per_byte).reshape(-1, per_byte)  # (bytes, per_byte)
        shifts = torch.arange(per_byte, device=q.device, dtype=torch.int16) * bits
        return (codes << shifts).sum(dim=1).to(torch.uint8)
    # 3, 5, 6, 7 bits: 8 values fill exactly ``bits`` bytes; build each 8-value word in int64.
    words = _pad_to(codes.to(torch.int64), 8).reshape(-1, 8)  # (W, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=1, keepdim=True)  # (W, 1), 8·bits ≤ 56 bits used
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    stream = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (W·bits,)
    return stream[: packed_numel(numel, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes of ``shape``."""
    check_bits(bits)
    numel = math.prod(shape)
    stream = packed.reshape(-1)
    if bits == 8:
        return stream[:numel].reshape(tuple(shape))
    if 8 % bits == 0:  # one contiguous shift-and-mask per field: vectorised, no broadcast
        mask = 2**bits - 1
        parts = [(stream >> shift) & mask for shift in range(0, 8, bits)]
        fields = torch.stack(parts, dim=-1)  # (bytes, 8 // bits)
    else:
        stream = _pad_to(stream, bits).to(torch.int64).reshape(-1, bits)  # (W, bits)
        byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
        word = (stream << byte_shifts).sum(dim=1, keepdim=True)  # (W, 1)
        shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
        fields = ((word >> shifts) & (2**bits - 1)).to(torch.uint8)  # (W, 8)
    return fields.reshape(-1)[:numel].reshape(tuple(shape))


def _pad_to(values: torch.Tensor, multiple: int) -> torch.Tensor:
    """1-D ``values`` padded with zeros to a multiple of ``multiple``."""
    pad = -values.numel() % multiple
    if not pad:
        return values
    return torch.cat([values, values.new_zeros(pad)])


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> int8 codes in [-127, 127] and (N,) float32 scales ``max|w_n| / 127``.

    Symmetric per output channel, the weight side of W8A8 (LLM.int8()'s vector-wise
    quantization, arXiv 2208.07339; SmoothQuant, arXiv 2211.10438). -128 is left out so the
    grid is symmetric and int8 GEMMs that negate operands cannot overflow.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale
