"""Weight-only CUDA matmuls behind :class:`~slimline.quantize.qlinear.QuantLinear`.

slimline's own kernels are CPU code; on a GPU a packed layer runs torch's weight-only CUDA
kernels, which read the codes as int4/int8 (the bytes that make decode memory-bound), where
the torch build has them and the layer fits them:

* int4 — ``aten._weight_int4pack_mm``: tinygemm, the int4 kernel of gpt-fast
  and torchao's int4 weight-only path (tensor-core m16n8k16 tiles, sm_80+). bfloat16
  activations only; groups of 32/64/128/256; ``N % 8 == 0``; ``K`` a multiple of
  16·innerKTiles. It computes ``w = (q - 8)·s + m`` per group, the same table as torch's CPU
  int4 kernel (:func:`~slimline.quantize.kernels_weight_only.int4pack_scales_zeros`), and
  ``kernels_weight_only.int4pack_linear`` calls it for a layer packed by :func:`int4_weight`;
* int8 — ``aten._weight_int8pack_mm`` on CUDA (newer torch builds register
  one: a warp per output, x widened to float32), for 8-bit per-channel symmetric layers. It
  takes signed codes, so the layer keeps a signed copy beside its stored (offset) ones: on a
  GPU an int8 layer holds its weight bytes twice, as on the CPU's int8 kernel
  (``kernels_weight_only.int8pack_linear`` serves both).

What is known without a GPU is tested on the CPU: the byte order the packing kernel reads
(:func:`nibble_pairs`, from its documented layout), the scale/zero table through the CPU
twin of the int4 kernel, the shapes through the operators' fake-tensor kernels, and which
path :func:`cuda_path` picks. Speed is measured by ``benchmarks/cuda_check.py`` on a GPU.
"""

from __future__ import annotations

import torch

from slimline.quantize.kernels_weight_only import int4pack_group

K_TILE = 16  # the k extent of one m16n8k16 tensor-core tile
INNER_K_TILES = (8, 4, 2)  # k-tiles packed back to back (16/8/4-byte loads), widest first
N_TILE = 8  # outputs per tile of the packed tensor
MIN_CAPABILITY = (8, 0)  # tinygemm's mma.sync tiles need Ampere or newer
# Up to how many rows the packed kernels run a call; beyond, dequantize + cuBLAS. tinygemm's
# time grows with the rows (torchao's HQQ README, A6000, 4096x4096 g128: 0.038 ms at 16 rows,
# 0.25 ms at 128) while cuBLAS's barely moves; the int8 kernel reads the weight once per row.
# Not yet measured on this project's GPU: benchmarks/cuda_check.py times both sides.
INT4_MAX_ROWS = 32
INT8_MAX_ROWS = 16


def inner_k_tiles(in_features: int) -> int | None:
    """The widest innerKTiles (8, 4 or 2) whose ``16 · tiles`` divides ``K``, or None."""
    for tiles in INNER_K_TILES:
        if in_features % (K_TILE * tiles) == 0:
            return tiles
    return None


def int4_group(out_features: int, in_features: int, group: int) -> int | None:
    """The group size tinygemm would run this layer with, or None where it cannot."""
    if out_features % N_TILE or inner_k_tiles(in_features) is None:
        return None
    return int4pack_group(out_features, in_features, group, n_multiple=N_TILE)


def nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> the (N, K/2) uint8 input of ``_convert_weight_to_int4pack``:
    byte j holds column 2j in its high nibble and column 2j+1 in its low one (the CUDA
    packing kernel's documented reading of a byte)."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"expected (N, K) codes with even K, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()


def int4_weight(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes on the GPU -> tinygemm's int32 tile layout
    ``(N/8, K/(16·tiles), 32, tiles/2)``."""
    tiles = inner_k_tiles(codes.shape[1])
    if tiles is None:
        raise ValueError(f"in_features {codes.shape[1]} is not a multiple of {2 * K_TILE}")
    return torch.ops.aten._convert_weight_to_int4pack(nibble_pairs(codes), tiles)


def registered_on_cuda(operator: str) -> bool:
    """Whether this torch build has a CUDA kernel for ``aten::<operator>`` (False on CPU
    builds, and where the dispatcher query — a private torch API — is missing)."""
    query = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if query is None:
        return False
    try:
        return bool(query(f"aten::{operator}", "CUDA"))
    except RuntimeError:  # an operator this build does not define
        return False


def cuda_path(
    *,
    bits: int,
    symmetric: bool,
    per_channel: bool,
    out_features: int,
    in_features: int,
    group: int,
    dtype: torch.dtype,
    rows: int,
    capability: tuple[int, int],
    registered: dict[str, bool],
    needs_grad: bool = False,
) -> tuple[str, str]:
    """(path, why not faster) for a CUDA call of ``rows`` rows: "int4pack_cuda",
    "int8pack_cuda" or "dequant"; the reason is "" where a packed kernel runs or none applies
    (past :data:`INT4_MAX_ROWS` / :data:`INT8_MAX_ROWS` rows dequantizing is the fast path;
    a call that needs gradients, or has no rows, dequantizes: the kernels have no backward).

    ``registered`` says which torch operators have CUDA kernels in this build
    (:func:`registered_on_cuda`), ``capability`` the device's compute capability.
    """
    if needs_grad or rows == 0:
        return "dequant", ""
    if (bits == 4 and rows > INT4_MAX_ROWS) or (bits == 8 and rows > INT8_MAX_ROWS):
        return "dequant", ""
    if bits == 4:
        if not registered.get("_weight_int4pack_mm", False):
            return "dequant", "this torch build has no CUDA int4 kernel"
        if capability < MIN_CAPABILITY:
            major, minor = capability
            return "dequant", f"torch's int4 CUDA kernel needs sm_80+, the GPU is sm_{major}{minor}"
        if int4_group(out_features, in_features, group) is None:
            return "dequant", (
                f"torch's int4 CUDA kernel needs out_features % {N_TILE} == 0, in_features a "
                f"multiple of {2 * K_TILE} and groups of 32/64/128/256 (this layer: "
                f"{out_features}x{in_features}, group {group})"
            )
        if dtype != torch.bfloat16:
            return "dequant", (
                f"torch's int4 CUDA kernel takes bfloat16 activations, these are "
                f"{str(dtype).removeprefix('torch.')} (fix: a `half` step with dtype bfloat16)"
            )
        return "int4pack_cuda", ""
    if bits == 8 and symmetric and per_channel:
        if registered.get("_weight_int8pack_mm", False):
            return "int8pack_cuda", ""
        return "dequant", "this torch build has no CUDA int8 weight-only kernel"
    return "dequant", ""
