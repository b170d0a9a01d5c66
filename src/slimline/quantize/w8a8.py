"""The SmoothQuant layer: W8A8 with a per-channel smoothing of its input (arXiv 2211.10438).

``y = (x · diag(m)) · Ŵᵀ + b`` where ``m = 1/s`` is the smoothing vector and ``Ŵ`` is the
int8 (per output channel) quantization of ``W · diag(s)``: mathematically the float layer,
with the activations' outlier channels shrunk by ``s`` and the weights' matching columns
grown by it, so both quantize well to 8 bits.

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
from slimline.quantize import kernels
from slimline.quantize.packing import quantize_per_channel_int8
from slimline.quantize.qlinear import (
    Int8DynamicLinear,
    _activation_bits,
    _bias_of,
    _check_version,
    _dtype,
)


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
        if static and self.use_onednn:
            kernels.register_onednn_static_op()

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
        machine's :func:`~slimline.quantize.kernels.activation_bits`), or None for dynamic
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
