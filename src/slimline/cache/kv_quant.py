"""Round-to-nearest quantization of attention keys and values: pure tensor maths.

The KV cache of a decoder grows with every generated token; storing it as 8-bit (or 4-bit)
integer codes with one float scale per small group cuts its bytes by about 4x (8x) against
float32. Which elements share a scale is the ``axis`` over which the statistics are taken:

* ``axis=-1`` — per token (and per head): one scale over the ``D`` channels of a head's key
  or value vector. Appending a token never touches older codes. KIVI (arXiv 2402.02750, §3)
  uses it for values, whose errors stay local to the token that attends to them;
* ``axis=-2`` — per channel: one scale per channel over a group of tokens. KIVI uses it for
  keys, whose outliers sit in a few fixed channels (their Fig. 2), which per-token scales
  spread over the whole vector; at 2–4 bits this matters, at 8 bits much less.

Grids (the same as the weight quantizers of ``slimline.quantize.packing``), ``h = 2^(b-1)``:

* **symmetric**: ``s = 2·max|x| / (2^b - 1)``, signed codes ``c = clamp(round(x / s), -h,
  h - 1)``, ``x̂ = c·s`` (all ``2^b`` levels used);
* **asymmetric**: ``s = (max - min) / (2^b - 1)``, ``c = round((x - min) / s) - h`` and the
  offset ``o = min + h·s``, so ``x̂ = c·s + o``: one multiply-add, as for the symmetric grid.

Either way ``|x - x̂| ≤ s / 2`` for every element. Codes are signed int8 at 8 bits; at 4 bits
two codes share an int8 byte (codes ``j`` and ``j + D/2`` of a vector: unpacking is two shifts
and a concatenation, with no interleaving copy).
Scales and offsets stay float32: a float16 scale of a small key group can fall below the
normal range, and at ``D = 32`` the four bytes per vector are an eighth of its codes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_BITS = (4, 8)
_TINY = torch.finfo(torch.float32).tiny


class QuantizedKV(NamedTuple):
    """Codes of a key or value tensor and the statistics to dequantize them."""

    codes: torch.Tensor  # int8 (..., D) at 8 bits; int8 (..., D / 2), two codes a byte, at 4
    scale: torch.Tensor  # float32, the input's shape with size 1 along the reduced axis
    offset: torch.Tensor | None  # float32 like ``scale``; None for the symmetric grid


def check_kv_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def quantize_kv(x: torch.Tensor, bits: int, axis: int, *, symmetric: bool) -> QuantizedKV:
    """Quantize ``x`` (..., D) with one scale per slice along ``axis`` (see module docstring)."""
    check_kv_bits(bits)
    half, levels = 2 ** (bits - 1), 2**bits - 1
    x = x.detach().float()
    # An all-zero (symmetric) or constant (asymmetric) slice gets the smallest normal scale:
    # its codes are then all 0 (or -h) and it dequantizes exactly.
    if symmetric:
        scale = x.abs().amax(dim=axis, keepdim=True).mul_(2.0 / levels).clamp_min_(_TINY)
        codes = torch.round(x / scale).clamp_(-half, half - 1)
        offset = None
    else:
        lo = x.amin(dim=axis, keepdim=True)
        scale = (x.amax(dim=axis, keepdim=True) - lo).div_(levels).clamp_min_(_TINY)
        codes = torch.round((x - lo) / scale).clamp_(0, levels).sub_(half)
        offset = lo.add_(scale, alpha=half)
    codes = codes.to(torch.int8)
    return QuantizedKV(pack_int4(codes) if bits == 4 else codes, scale, offset)


def dequantize_kv(
    q: QuantizedKV,
    bits: int,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x̂ = c·s (+ o)`` in ``dtype``; ``scale``/``offset`` broadcast against the codes.

    ``out`` (the codes' unpacked shape, any float dtype, may be a strided view) receives the
    result in place of a new tensor: one pass over the codes, no float temporary.
    """
    check_kv_bits(bits)
    codes = unpack_int4(q.codes) if bits == 4 else q.codes
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    torch.mul(codes, q.scale, out=out)
    if q.offset is not None:
        out.add_(q.offset)
    return out


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes (..., D), D even -> int8 (..., D / 2): byte ``j`` holds code ``j``
    in its low nibble and code ``j + D/2`` in its high nibble, both two's complement."""
    d = codes.shape[-1]
    if d % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {d}")
    low, high = codes[..., : d // 2], codes[..., d // 2 :]
    return (low & 0x0F) | (high << 4)  # high << 4 stays in int8: [-8, 7] * 16 in [-128, 112]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 (..., D / 2) -> int8 codes (..., D) in [-8, 7].

    Arithmetic shifts of int8 sign-extend, so each nibble comes back signed in two ops.
    """
    return torch.cat([(packed << 4) >> 4, packed >> 4], dim=-1)


def nbytes(q: QuantizedKV) -> int:
    """Bytes held by the codes, scales and offsets as stored."""
    parts = [q.codes, q.scale] + ([q.offset] if q.offset is not None else [])
    return sum(t.numel() * t.element_size() for t in parts)
