"""The int8 GEMMs behind the W8A8 layers (``int8_dynamic``, ``smoothquant``), and which ones
this build of torch and this CPU run exactly.

Measured with 2 threads on a 2-core AMD EPYC (Zen 5: AVX-512 VNNI and BF16, no AMX), torch
2.13; the choices below follow these numbers. (Weight-only kernels:
:mod:`slimline.quantize.kernels_weight_only`.)

Dynamic W8A8 (``int8_dynamic``): int8 weights with one scale per output channel, and
activations quantized at run time to uint8 with one scale and zero point per token
(LLM.int8()'s vector-wise quantization, arXiv 2208.07339, without its outlier split;
SmoothQuant's per-token dynamic W8A8, arXiv 2211.10438, with asymmetric activations). The
GEMM runs in int8 with int32 accumulation; per-token scales and zero points are applied to its
output by :func:`rescale`:

* :func:`onednn_int8_mm` — oneDNN's u8·s8 GEMM (``onednn.qlinear_pointwise`` on a weight
  prepacked by ``onednn.qlinear_prepack``). Its s8-activation path is a reference kernel,
  orders of magnitude slower, hence u8 activations. Wrapped in a custom op, since inductor's
  own lowering of ``qlinear_pointwise`` needs a frozen (constant) weight;
* :func:`int_mm_int8_mm` — ``torch._int_mm`` (s8 · s8 -> s32), where oneDNN is missing.

Both GEMMs run at about 1.75 TFLOP/s on 2016×384 · 384×1536 (bfloat16 0.76, float32 0.19);
oneDNN is preferred because it applies the weight scales in its epilogue and returns float32,
one pass over the output fewer (all-MiniLM-L6-v2 eager: 0.50× vs 0.65× the float32 time).

Static W8A8 (``smoothquant`` with calibrated activation scales) runs the same custom op with
one scale and zero point per tensor and the bias, all applied in oneDNN's epilogue
(:func:`onednn_static_linear`): one op definition serves both.

On x86 CPUs without an int8 dot product (VNNI or AMX) oneDNN multiplies with ``vpmaddubsw``,
which adds each pair of u8·s8 products into a *saturating* int16: 8-bit activations times
large weights overflow it (2·255·127 > 32767), 7-bit ones cannot (2·127·128 ≤ 32767). New
layers there quantize activations to 7 bits (:func:`activation_bits`, PyTorch's fbgemm
``reduce_range``), and a layer stored with 8-bit activations runs its GEMM in two exact passes
(:func:`onednn_int8_mm_split`), so the result equals integer arithmetic on every machine.

Nothing here runs at import: capabilities are probed on first use and cached.
"""

from __future__ import annotations

import functools
import math
import platform
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from slimline.evaluate.conditions import cpu_features

_OP_NAMESPACE = "slimline"
_ONEDNN_OP = "onednn_int8_mm"
# uint8 activation codes minus 128 are the int8 codes ``torch._int_mm`` takes.
U8_OFFSET = 128
# Activation widths of the W8A8 layers: 8, or 7 where the GEMM could saturate (module doc).
ACTIVATION_BITS = (7, 8)
# CPU flags of an int8 dot product accumulating in int32 (VNNI's vpdpbusd, AMX's tdpbusd).
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


# --- dynamic int8 (W8A8) ------------------------------------------------------------------


def quantize_per_token(
    x: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 codes with one scale and zero point per token (row of the last dim).

    For each token, ``[lo, hi] = [min(x, 0), max(x, 0)]`` is cut in ``L = 2^bits - 3`` steps
    (253 at 8 bits) of ``s = (hi - lo) / L``, the integer zero point is
    ``z = round(-lo / s) + 1`` and ``u = round(x / s + z)``, so ``x ≈ (u - z) · s`` with ``u``
    in [0, 2^bits - 1] and ``x = 0`` exact. Returns ``u`` (..., K) uint8 and ``s``, ``z``
    (..., 1) float32 (``z`` integer). ``bits=7`` is the grid of CPUs whose int8 GEMM would
    saturate on 8-bit codes (module doc).

    Why ``2^bits - 3`` steps and the +1: ``x / s + z`` then stays within [0.5, L + 1.5], so
    rounding never leaves [0, 2^bits - 1] and no clamp pass is needed (0.8 % of the
    resolution at 8 bits). The codes are rounded in int8 (``u - 128``) and reinterpreted,
    because float → int8 conversion is vectorised in ATen and float → uint8 is not (4× slower
    on AVX-512). Asymmetric codes use
    every level where a token's values are skewed (GELU outputs, LayerNorm outputs with a
    one-sided outlier channel): on all-MiniLM-L6-v2 they halve the embedding error of
    symmetric int8 activations.
    """
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)  # (..., 1); amin + amax beat aminmax
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / float(2**bits - 3)).clamp(min=1e-12)
    zero = torch.round(-lo / scale) + 1.0
    if torch.compiler.is_compiling():  # inductor converts to uint8 in vector registers
        return (xf * scale.reciprocal() + zero).round().to(torch.uint8), scale, zero
    signed = (xf * scale.reciprocal()).add_(zero - U8_OFFSET).round_().to(torch.int8)
    codes = signed.view(torch.uint8).bitwise_xor_(U8_OFFSET)  # u = (u - 128) + 128
    return codes, scale, zero


def rescale(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    w_offset: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Float output of an asymmetric-activation int8 GEMM.

    ``acc`` (..., N) is ``s_w[n] · Σ_k u[k] · q_W[n, k]`` and ``w_offset`` (N,) is
    ``s_w[n] · Σ_k q_W[n, k]``, so ``y = s_x · (acc - z · w_offset) + b``: the rank-1 term
    removes each token's zero point (the int GEMM itself runs with zero point 0).
    """
    out = torch.addcmul(
        bias.float() if bias is not None else acc.new_zeros(()), x_scale * x_zero, -w_offset
    )  # (..., N)
    return out.addcmul_(acc, x_scale).to(dtype)


def weight_offset(weight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(N,) ``s_w[n] · Σ_k q_W[n, k]`` for an (N, K) int8 weight (see :func:`rescale`)."""
    return weight.sum(dim=1, dtype=torch.int32).float() * w_scale.float()


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's quantized linear runs here (probed once, on a tiny problem)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight = torch.ones(16, 16, dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        x = torch.full((2, 16), 3, dtype=torch.uint8)
        out = _onednn_mm(x, packed, torch.ones(16))
        return bool((out == 48).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def onednn_saturates() -> bool:
    """Whether oneDNN's u8·s8 GEMM can saturate on 8-bit activations here (module doc).

    An x86 CPU without :data:`INT8_DOT_FLAGS` does; elsewhere the kernel itself is run on
    the worst case, which also catches a oneDNN held below VNNI by ``ONEDNN_MAX_CPU_ISA``.
    """
    if not onednn_available():
        return False
    if platform.machine().lower() in _X86 and not INT8_DOT_FLAGS.intersection(cpu_features()):
        return True
    weight = torch.full((16, 64), 127, dtype=torch.int8)
    codes = torch.full((8, 64), 255, dtype=torch.uint8)
    out = _onednn_mm(codes, onednn_prepack(weight), torch.ones(16))
    return not bool((out == 64 * 255 * 127).all())  # < 2^24: exact in float32


def activation_bits() -> int:
    """The activation width a new W8A8 layer takes here: 8, or 7 where oneDNN saturates.

    7 bits keep every pair of u8·s8 products within int16 (PyTorch's ``reduce_range``), at
    the cost of half the activation resolution; 8-bit grids stay exact on such a CPU only by
    running the GEMM twice (:func:`onednn_int8_mm_split`).
    """
    return 7 if onednn_saturates() else 8


def w8a8_kernel_note() -> str:
    """How a new W8A8 layer runs here, for a step's notes."""
    if not onednn_available():
        return "torch._int_mm, 8-bit activations"
    if activation_bits() == 7:
        return "oneDNN u8·s8 GEMM, 7-bit activations (no VNNI: 8 bits would saturate it)"
    return "oneDNN u8·s8 GEMM, 8-bit activations"


def check_activation_bits(bits: int) -> int:
    """``bits`` if it is one of :data:`ACTIVATION_BITS`, else ValueError naming the field."""
    if isinstance(bits, bool) or bits not in ACTIVATION_BITS:
        raise ValueError(f"activation_bits: must be one of {ACTIVATION_BITS}, got {bits!r}")
    return bits


def onednn_prepack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 weight -> oneDNN's opaque prepacked layout (not portable: never saved)."""
    # The prepack reads the memory as row-major whatever the strides: a transposed view
    # (GPT-2's Conv1D weight) would be packed as its transpose.
    packed: torch.Tensor = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
    return packed


def _onednn_qlinear(
    codes: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    x_zero: int,
) -> torch.Tensor:
    """(..., K) uint8 with one scale and zero point · prepacked (N, K) int8 -> (..., N) float32.

    ``y = s_x · s_w[n] · Σ_k (u - z_x) · q_W + b``: the dot products accumulate in int32 and
    are scaled once in float32 (exact integers while ``|acc| < 2^24``); the zero point and the
    bias are applied in oneDNN's epilogue. Dynamic layers pass ``s_x = 1``, ``z_x = 0`` and no
    bias: their per-token scales and zero points are applied afterwards by :func:`rescale`,
    since oneDNN takes only one per tensor.
    """
    zero_points = torch.zeros(w_scale.shape, dtype=torch.int64, device=w_scale.device)
    out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
        codes, x_scale, x_zero, packed, w_scale.float(), zero_points,
        bias, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip
    return out


def _onednn_mm(codes: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 · prepacked (N, K) int8 -> (..., N) float32 ``s_w[n] · Σ_k u·q_W``."""
    return _onednn_qlinear(codes, packed, w_scale, None, 1.0, 0)


@functools.cache
def register_onednn_op() -> None:
    """Define ``torch.ops.slimline.onednn_int8_mm`` (once, on first use; not at import).

    One op for the dynamic and the static layers (see :func:`_onednn_qlinear`). A custom op
    is opaque to inductor, which then calls it as an extern kernel and still fuses the
    quantize and rescale ops around it.
    """
    name = f"{_OP_NAMESPACE}::{_ONEDNN_OP}"
    op = torch.library.custom_op(name, mutates_args=())(_onednn_qlinear_op)

    def fake(
        codes: torch.Tensor,
        packed: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None,
        x_scale: float,
        x_zero: int,
    ) -> torch.Tensor:
        return codes.new_empty((*codes.shape[:-1], w_scale.shape[0]), dtype=torch.float32)

    op.register_fake(fake)

    @register_flop_formula(torch.ops.slimline.onednn_int8_mm)
    def flops(codes_shape: Any, packed_shape: Any, scale_shape: Any, *_: Any, **__: Any) -> int:
        # (M, K) · (K, N): one multiply and one add per term, as FlopCounterMode counts mm.
        m = math.prod(codes_shape[:-1])
        return 2 * m * codes_shape[-1] * scale_shape[0]


def _onednn_qlinear_op(
    codes: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    x_zero: int,
) -> torch.Tensor:
    return _onednn_qlinear(codes, packed, w_scale, bias, x_scale, x_zero)


def onednn_int8_mm(
    codes: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """``s_w[n] · Σ_k u · q_W`` on oneDNN, through the custom op (see :func:`_onednn_mm`)."""
    out: torch.Tensor = torch.ops.slimline.onednn_int8_mm(codes, packed, w_scale, None, 1.0, 0)
    return out


def split_high_bit(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``u`` -> ``(h, l)`` with ``u = 128 · h + l``, ``h`` in {0, 1}, ``l`` in [0, 127].

    Both halves are 7-bit codes, which the saturating int16 pair sums cannot overflow.
    """
    return codes >> 7, codes & 0x7F


def onednn_int8_mm_split(
    codes: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """:func:`onednn_int8_mm` exact for 8-bit codes where oneDNN saturates: two passes.

    ``Σ u · q_W = 128 · Σ h · q_W + Σ l · q_W`` (:func:`split_high_bit`): twice the GEMM
    time, the price of an 8-bit model on a CPU without VNNI (exact while ``|acc| < 2^24``).
    """
    high, low = split_high_bit(codes)
    top = onednn_int8_mm(high, packed, w_scale)
    return torch.add(onednn_int8_mm(low, packed, w_scale), top, alpha=128.0)


def int_mm_int8_mm(
    codes: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """The same as :func:`onednn_int8_mm` on ``torch._int_mm`` (s8 · s8 -> s32).

    ``weight_t`` is the (K, N) int8 weight. ``_int_mm`` takes signed activations, so it runs
    on ``u - 128`` and adds ``128 · Σ_k q_W`` back to the int32 result.
    """
    signed = (codes ^ U8_OFFSET).view(torch.int8)  # u - 128, same bits with the top one flipped
    rows = signed.reshape(-1, signed.shape[-1])  # (M, K)
    acc = torch._int_mm(rows, weight_t) + U8_OFFSET * weight_t.sum(dim=0, dtype=torch.int32)
    return (acc.float() * w_scale.float()).reshape(*codes.shape[:-1], acc.shape[-1])


# --- static int8 (W8A8 with calibrated per-tensor activation scales) ----------------------


def quantize_static(
    x: torch.Tensor, multiplier: torch.Tensor, zero: int, bits: int = 8
) -> torch.Tensor:
    """uint8 codes ``clamp(round(x · m) + z, 0, 2^bits - 1)`` with a calibrated multiplier.

    ``multiplier`` is (K,) — one scale for the tensor, divided into any per-channel
    smoothing (``m = smooth / s_x``), so smoothing costs nothing over plain static
    quantization. Values outside the calibrated range saturate. Rounded in int8 and
    reinterpreted, for the reason given in :func:`quantize_per_token`; ``bits=7`` for CPUs
    whose int8 GEMM would saturate on 8-bit codes (module doc).
    """
    top = 2**bits - 1 - U8_OFFSET
    if torch.compiler.is_compiling():  # inductor converts to uint8 in vector registers
        unsigned = (x.float() * multiplier + zero).round().clamp(0, top + U8_OFFSET)
        return unsigned.to(torch.uint8)
    signed = (x.float() * multiplier).add_(zero - U8_OFFSET).round_().clamp_(-U8_OFFSET, top)
    return signed.to(torch.int8).view(torch.uint8).bitwise_xor_(U8_OFFSET)


def onednn_static_linear(
    codes: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    x_zero: int,
) -> torch.Tensor:
    """Static W8A8 GEMM on oneDNN, through the custom op (see :func:`_onednn_qlinear`)."""
    out: torch.Tensor = torch.ops.slimline.onednn_int8_mm(
        codes, packed, w_scale, bias, x_scale, x_zero
    )
    return out


def onednn_static_linear_split(
    codes: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    x_zero: int,
) -> torch.Tensor:
    """:func:`onednn_static_linear` exact for 8-bit codes where oneDNN saturates: two passes.

    ``s_x · Σ (u - z) · q_W = 128 · s_x · Σ h · q_W + s_x · Σ (l - z) · q_W``
    (:func:`split_high_bit`); the zero point and bias go to the second pass.
    """
    high, low = split_high_bit(codes)
    top = onednn_static_linear(high, packed, w_scale, None, 128.0 * x_scale, 0)
    return onednn_static_linear(low, packed, w_scale, bias, x_scale, x_zero) + top
