"""The W8A8 layers: int8 weights, activations quantized to uint8, an int8 GEMM.

* :class:`Int8DynamicLinear` — int8 weight with per-channel scales; activations quantized
  per token at run time. Used by ``int8_dynamic``.
* :class:`SmoothQuantLinear` — the same with a per-channel smoothing of its input (SmoothQuant,
  arXiv 2211.10438), and activations quantized per token or statically. Used by ``smoothquant``.

Both keep every tensor needed for inference in persistent buffers (``state_dict()`` is the
checkpoint); oneDNN's prepacked weight is derived from them and never saved.

**SmoothQuant.** ``y = (x · diag(m)) · Ŵᵀ + b`` where ``m = 1/s`` is the smoothing vector and
``Ŵ`` is the int8 (per output channel) quantization of ``W · diag(s)``: mathematically the
float layer, with the activations' outlier channels shrunk by ``s`` and the weights' matching
columns grown by it, so both quantize well to 8 bits.

The paper folds ``1/s`` into the preceding LayerNorm. That is only exact when the norm's
output feeds nothing else; in post-LN BERT the same output is also the residual, and in
general a layer's producer is unknown. Here the multiply by ``m`` stays in the layer, where it
costs nothing extra: it is folded into the activation quantizer's own multiply — exactly for
static quantization (one per-channel multiplier ``m / s_x``), and fused into the same pass by
``torch.compile`` for dynamic per-token quantization.

Activations are quantized to uint8 either *dynamically*, one scale and zero point per token
(as ``int8_dynamic``), or *statically*, one scale and zero point for the whole tensor fixed
from calibration data (the paper's O3 setting, the fastest: no reduction over the token at
run time, and oneDNN applies scale, zero point and bias in its GEMM epilogue).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimline.core.modules import register_module
from slimline.core.targets import linear_weight
from slimline.quantize import kernels_int8 as kernels
from slimline.quantize.packing import quantize_per_channel_int8
from slimline.quantize.qlinear import (
    META_VERSION,
    LogicalWeightCounts,
    _bias_of,
    _check_version,
    _dtype,
    _dtype_name,
    _KernelCacheMixin,
)


@register_module
class Int8DynamicLinear(LogicalWeightCounts, _KernelCacheMixin):
    """Dynamic W8A8 linear: ``y = ((q_x - z_x) · q_Wᵀ) · s_x[:, None] · s_w[None, :] + b``.

    ``q_W`` (N, K) int8 in [-127, 127] with one scale per output channel ``s_w`` (N,);
    ``q_x`` uint8 with one scale and zero point per token, computed at run time (see
    :func:`slimline.quantize.kernels_int8.quantize_per_token`). The product accumulates in int32.
    Buffers: ``qweight`` (N, K) int8, ``weight_scale`` (N,) float32, ``bias`` (N,).

    ``activation_bits`` (8, or 7 by default on CPUs whose int8 GEMM would saturate: see
    :func:`slimline.quantize.kernels_int8.activation_bits`) is part of the model, saved in its
    metadata: the grid is what the model was evaluated with, so a checkpoint computes the
    same numbers on every machine. Only the kernel is chosen per machine — an 8-bit layer on
    a CPU without VNNI runs its GEMM in two exact passes rather than saturating.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        activation_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        bits = kernels.activation_bits() if activation_bits is None else activation_bits
        self.activation_bits = kernels.check_activation_bits(bits)
        self.qweight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        # Decided once here, not in forward, so that torch.compile sees plain attributes.
        self.use_onednn = kernels.onednn_available()
        self.split_high_bit = self.use_onednn and bits == 8 and kernels.onednn_saturates()
        if self.use_onednn:
            kernels.register_onednn_op()
        self._init_cache()

    @classmethod
    def from_float(
        cls, module: nn.Module, *, activation_bits: int | None = None
    ) -> Int8DynamicLinear:
        """Quantize an ``nn.Linear`` or ``Conv1D`` weight per output channel.

        ``activation_bits`` None: this machine's
        :func:`~slimline.quantize.kernels_int8.activation_bits`.
        """
        weight = linear_weight(module).detach()  # (N, K)
        q, scale = quantize_per_channel_int8(weight)
        bias = _bias_of(module)
        layer = cls(
            weight.shape[1], weight.shape[0], bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            activation_bits=activation_bits,
        )  # fmt: skip
        # GPT-2's Conv1D gives a transposed (non-contiguous) view: oneDNN's prepack reads the
        # raw memory as row-major (N, K), so the codes must be laid out that way.
        layer.qweight = q.contiguous()
        layer.weight_scale = scale
        layer.bias = bias
        return layer.to(weight.device)

    def refresh_kernels(self) -> None:
        """Re-derive the kernel inputs from the buffers (oneDNN's prepacked weight on CPU)."""
        super().refresh_kernels()
        self._derived["offset"] = kernels.weight_offset(self.qweight, self.weight_scale)
        if self.use_onednn and self.qweight.device.type == "cpu":
            self._derived["onednn"] = kernels.onednn_prepack(self.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "offset" not in self._derived:  # e.g. after deepcopy, which drops derived layouts
            self.refresh_kernels()
        codes, x_scale, x_zero = kernels.quantize_per_token(x, self.activation_bits)
        acc = self._int8_mm(codes)  # (..., N)
        return kernels.rescale(acc, x_scale, x_zero, self._derived["offset"], self.bias, x.dtype)

    def _int8_mm(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., K) uint8 codes -> (..., N) float32 ``s_w[n] · Σ_k u · q_W``, exactly."""
        if self.use_onednn and codes.device.type == "cpu":
            packed = self._derived["onednn"]
            if self.split_high_bit:
                return kernels.onednn_int8_mm_split(codes, packed, self.weight_scale)
            return kernels.onednn_int8_mm(codes, packed, self.weight_scale)
        return kernels.int_mm_int8_mm(codes, self.qweight.t(), self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight ``q_W · s_w`` (activation rounding not included)."""
        return (self.qweight.float() * self.weight_scale[:, None]).to(dtype)

    def kernel_name(self) -> str:
        """The GEMM ``forward`` runs on CPU: "onednn", "onednn-2pass" or "_int_mm"."""
        if not self.use_onednn:
            return "_int_mm"
        return "onednn-2pass" if self.split_high_bit else "onednn"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation_bits={self.activation_bits}, "
            f"kernel={self.kernel_name()}"
        )

    def slimline_meta(self) -> dict[str, Any]:
        return {
            "version": META_VERSION,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "bias_dtype": _dtype_name(self.bias.dtype) if self.bias is not None else "float32",
            "activation_bits": self.activation_bits,
        }

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> nn.Module:
        _check_version(meta)
        return cls(
            int(meta["in_features"]), int(meta["out_features"]), bias=bool(meta["bias"]),
            bias_dtype=_dtype(meta["bias_dtype"]), activation_bits=_activation_bits(meta),
        )  # fmt: skip


def _activation_bits(meta: dict[str, Any]) -> int:
    """The stored activation width; checkpoints written before it was recorded used 8."""
    bits = meta.get("activation_bits", 8)
    if not isinstance(bits, int):
        raise ValueError(f"activation_bits: must be an integer in the metadata, got {bits!r}")
    return bits




@register_module
class SmoothQuantLinear(Int8DynamicLinear):
    """W8A8 linear with a smoothing vector and dynamic or static activation quantization.

    Buffers: those of :class:`Int8DynamicLinear` (``qweight`` (N, K) int8, ``weight_scale``
    (N,), ``bias``), ``smooth`` (K,) float32 — the multiplier ``1/s`` applied to the input —
    and, when static, ``input_scale`` () float32 and ``input_zero`` () int32, the calibrated
    uint8 grid of the smoothed input, with ``2^activation_bits`` levels (7 bits by default
    where the CPU's int8 GEMM would saturate; stored, as for :class:`Int8DynamicLinear`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        static: bool,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        activation_bits: int | None = None,
    ) -> None:
        self.static = static
        self._x_qparams = (1.0, 0)
        super().__init__(
            in_features, out_features, bias=bias, bias_dtype=bias_dtype,
            activation_bits=activation_bits,
        )  # fmt: skip
        self.smooth: torch.Tensor
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32))
        self.input_scale: torch.Tensor | None
        self.input_zero: torch.Tensor | None
        self.register_buffer("input_scale", torch.ones(()) if static else None)
        self.register_buffer("input_zero", torch.zeros((), dtype=torch.int32) if static else None)

    @classmethod
    def from_smoothed(
        cls,
        module: nn.Module,
        smooth: torch.Tensor,
        input_qparams: tuple[float, int] | None,
        activation_bits: int | None = None,
    ) -> SmoothQuantLinear:
        """Quantize ``module`` (Linear or Conv1D) given its input multiplier ``smooth`` (K,).

        The weight quantized is ``W · diag(1/smooth)``; ``input_qparams`` is the static
        (scale, zero point) of the smoothed input on an ``activation_bits`` grid (None: this
        machine's :func:`~slimline.quantize.kernels_int8.activation_bits`), or None for dynamic
        per-token activations.
        """
        weight = linear_weight(module).detach().float()  # (N, K)
        smooth = smooth.detach().float().to(weight.device)
        if smooth.shape != (weight.shape[1],):
            raise ValueError(
                f"smoothing vector of shape {tuple(smooth.shape)} does not fit a weight "
                f"of shape {tuple(weight.shape)}"
            )
        q, scale = quantize_per_channel_int8(weight / smooth)
        bias = _bias_of(module)
        layer = cls(
            weight.shape[1], weight.shape[0], static=input_qparams is not None,
            bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
            activation_bits=activation_bits,
        )  # fmt: skip
        if input_qparams is not None and not 0 <= input_qparams[1] < 2**layer.activation_bits:
            raise ValueError(
                f"input_qparams: zero point {input_qparams[1]} is off the "
                f"{layer.activation_bits}-bit grid"
            )
        layer.qweight = q
        layer.weight_scale = scale
        layer.bias = bias
        layer.smooth = smooth.clone()
        if input_qparams is not None:
            x_scale, x_zero = input_qparams
            layer.input_scale = torch.tensor(float(x_scale))
            layer.input_zero = torch.tensor(int(x_zero), dtype=torch.int32)
        layer = layer.to(weight.device)
        layer.refresh_kernels()
        return layer

    def refresh_kernels(self) -> None:
        """Re-derive kernel inputs: those of the parent and the static input multiplier."""
        super().refresh_kernels()
        scale = getattr(self, "input_scale", None)
        zero = getattr(self, "input_zero", None)
        if self.static and scale is not None and zero is not None:
            # Python numbers, so that torch.compile sees constants and the oneDNN op scalars.
            self._x_qparams = (float(scale), int(zero))
            self._derived["multiplier"] = self.smooth / float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "offset" not in self._derived:  # e.g. after deepcopy, which drops derived layouts
            self.refresh_kernels()
        if self.static:
            return self._forward_static(x)
        xs = x.float() * self.smooth
        codes, x_scale, x_zero = kernels.quantize_per_token(xs, self.activation_bits)
        acc = self._int8_mm(codes)  # (..., N)
        return kernels.rescale(acc, x_scale, x_zero, self._derived["offset"], self.bias, x.dtype)

    def _forward_static(self, x: torch.Tensor) -> torch.Tensor:
        x_scale, x_zero = self._x_qparams
        codes = kernels.quantize_static(
            x, self._derived["multiplier"], x_zero, self.activation_bits
        )
        bias = None if self.bias is None else self.bias.float()
        if self.use_onednn and x.device.type == "cpu":
            linear = (
                kernels.onednn_static_linear_split if self.split_high_bit
                else kernels.onednn_static_linear
            )  # fmt: skip
            out = linear(codes, self._derived["onednn"], self.weight_scale, bias, x_scale, x_zero)
            return out.to(x.dtype)
        acc = kernels.int_mm_int8_mm(codes, self.qweight.t(), self.weight_scale)
        out = (acc - x_zero * self._derived["offset"]) * x_scale
        return (out if bias is None else out + bias).to(x.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight in the input's own space: ``q_W · s_w · diag(smooth)``."""
        weight = self.qweight.float() * self.weight_scale[:, None] * self.smooth[None, :]
        return weight.to(dtype)

    def extra_repr(self) -> str:
        mode = "static" if self.static else "dynamic"
        return f"{super().extra_repr()}, activations={mode}"

    def slimline_meta(self) -> dict[str, Any]:
        return {**super().slimline_meta(), "static": self.static}

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> nn.Module:
        _check_version(meta)
        return cls(
            int(meta["in_features"]), int(meta["out_features"]), static=bool(meta["static"]),
            bias=bool(meta["bias"]), bias_dtype=_dtype(meta["bias_dtype"]),
            activation_bits=_activation_bits(meta),
        )  # fmt: skip
