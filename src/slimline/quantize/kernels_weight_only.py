"""Weight-only CPU matmuls behind :class:`~slimline.quantize.qlinear.QuantLinear`.

Measured with 2 threads on a 2-core AMD EPYC (Zen 5: AVX-512 VNNI and BF16, no AMX), torch
2.13; the choices below follow these numbers. The kernel is chosen per call by
``QuantLinear.kernel_path``; decode-sized calls go first to slimline's own kernel
(:mod:`slimline.quantize.kernels_gemv`), these are what runs where it cannot:

* :func:`dequant_linear` — dequantize to the activation dtype, then ``F.linear``: works for
  every width, group and shape; the fastest beyond a few rows, and in float16;
* :func:`int4pack_linear` — ``aten._weight_int4pack_mm_for_cpu`` (tinygemm layout), for
  4-bit weights with ``N % 16 == 0`` and groups of 32/64/128/256 dividing ``K``; wins up to
  64 rows in bfloat16 and, for large layers, at one row in float32 (its float32 loop is not
  vectorised);
* :func:`int8pack_linear` — ``aten._weight_int8pack_mm``, for 8-bit per-channel symmetric
  weights with ``K % 16 == 0`` (its bfloat16 path returns garbage or crashes otherwise);
  wins up to 32 rows in bfloat16 and, for large layers, at one row in float32.

The W8A8 kernels (int8 activations too) are in :mod:`slimline.quantize.kernels_int8`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

INT4PACK_GROUPS = (32, 64, 128, 256)


def dequant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias`` with the already dequantized (N, K) weight."""
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def int4pack_group(
    out_features: int, in_features: int, group: int, *, n_multiple: int = 16
) -> int | None:
    """The group size torch's CPU int4 kernel would run this layer with, or None.

    A per-channel layer (``group == K``) runs with the largest supported group dividing
    ``K``, its one scale repeated over the groups. ``n_multiple``: what ``N`` must be a
    multiple of (16 on the CPU; tinygemm on CUDA takes 8).
    """
    if out_features % n_multiple or in_features % 2:
        return None
    if group in INT4PACK_GROUPS and in_features % group == 0:
        return group
    if group == in_features:
        fitting = [g for g in INT4PACK_GROUPS if in_features % g == 0]
        return max(fitting) if fitting else None
    return None


def int4pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> the CPU kernel's own (N, K/2) uint8 tile layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def int4pack_scales_zeros(
    scales: torch.Tensor, zeros: torch.Tensor, kernel_groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """(N, G) scales and zero points -> the kernel's (kernel_groups, N, 2) table.

    The kernel computes ``w = (q - 8) · s + m`` on unsigned codes; with ``w = (q - z) · s``
    that is ``m = (8 - z) · s`` (0 for a symmetric layer, stored with ``z = 8``).
    ``kernel_groups`` is a multiple of ``G`` (per-channel scales are repeated).
    """
    s = scales.float()  # (N, G)
    m = (8.0 - zeros.float()) * s
    table = torch.stack([s.t(), m.t()], dim=-1)  # (G, N, 2)
    table = table.repeat_interleave(kernel_groups // s.shape[1], dim=0)
    return table.to(dtype).contiguous()


def int4pack_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    group: int,
    scales_zeros: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with torch's int4 kernel (tinygemm) for the layout ``packed`` is in:
    the CPU's 2-D one (:func:`int4pack_weight`) or the GPU's 4-D tiles
    (:func:`slimline.quantize.kernels_cuda.int4_weight`, bfloat16 x); one scale table serves
    both."""
    mm = (torch.ops.aten._weight_int4pack_mm if packed.dim() == 4
          else torch.ops.aten._weight_int4pack_mm_for_cpu)  # fmt: skip
    return _rows_linear(x, bias, lambda rows: mm(rows, packed, group, scales_zeros))


def int8pack_fits(in_features: int) -> bool:
    """Whether ``aten._weight_int8pack_mm`` computes this width correctly (see module doc)."""
    return in_features % 16 == 0


def int8pack_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (weight · scales).T + bias`` for an (N, K) int8 weight and (N,) scales, on the
    CPU or a GPU. The CUDA kernel widens x and the scales to float32 itself, so the scales go
    in exact; the CPU kernel wants them in x's dtype."""
    exact = scales.float() if x.is_cuda else scales.to(x.dtype)
    return _rows_linear(
        x, bias, lambda rows: torch.ops.aten._weight_int8pack_mm(rows, weight, exact)
    )


def _rows_linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    matmul: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``matmul`` of x's rows as one contiguous (M, K) matrix, plus ``bias``, returned in x's
    leading shape: how every packed kernel here is called."""
    out = matmul(x.reshape(-1, x.shape[-1]).contiguous())  # (M, N)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
