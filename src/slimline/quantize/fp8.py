"""``fp8``: weights stored as 8-bit floats, E4M3 or E5M2 (Micikevicius et al., arXiv 2209.05433).

FP8 keeps a float's relative precision over a wide range instead of an integer grid's uniform
steps: E4M3 (4 exponent, 3 mantissa bits, no infinities, max 448 — torch's ``float8_e4m3fn``)
rounds each normal number within 2^-4 of itself; E5M2 (max 57344) trades a mantissa bit for
range and rounds within 2^-3. As the paper recommends for inference, weights use E4M3 with a
float32 scale per tensor or per output channel that maps the absolute maximum to the format's
largest finite value, so nothing overflows and the most normal-range precision is kept.

:class:`Fp8Linear` stores the weight as it is kept in memory, one byte per weight
(``float8_*`` in ``state_dict`` and in safetensors). On CPU it upcasts the weight and calls
``F.linear``. On a CUDA GPU with FP8 tensor cores (compute capability 8.9+) it multiplies with
``torch._scaled_mm``, the activations quantized to E4M3 on the fly (per tensor, or per row with
per-channel weight scales on 9.0+ in bfloat16); that path is guarded and falls back to the
upcast elsewhere. It has not been run on a GPU by its author (none was available).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.modules import register_module
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import linear_weight
from slimline.quantize.qlinear import LogicalWeightCounts
from slimline.search.ranges import Choice, SearchSpace

Fp8Format = Literal["e4m3", "e5m2"]
ScaleMode = Literal["tensor", "channel"]
META_VERSION = 1
FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_FLOAT_DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32)
}
# _scaled_mm needs the reduction dim K and the output dim N to be multiples of 16.
_MM_ALIGN = 16


@dataclass(frozen=True, kw_only=True)
class Fp8Config(MethodConfig):
    """Weight-only FP8: E4M3/E5M2 weights with float32 per-tensor or per-channel scales."""

    method: ClassVar[str] = "fp8"
    family: ClassVar[Family] = Family.QUANTIZE
    needs_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = "FP8 weights (E4M3/E5M2), per-tensor or per-channel scales"
    paper: ClassVar[str] = "FP8 formats, arXiv 2209.05433"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {
        "format": Choice("e4m3",
        "e5m2"),
        "scale": Choice("channel",
        "tensor"),
    }

    # E4M3 is the inference format of the paper: 3 mantissa bits cover weights' dynamic range.
    format: Fp8Format = "e4m3"
    # One scale per output channel costs 4 bytes a row and protects rows of small weights
    # from a single large row; "tensor" is what every FP8 GEMM accepts.
    scale: ScaleMode = "channel"


def fp8_max(fmt: Fp8Format) -> float:
    """The largest finite value of the format: 448 (E4M3, fn variant) or 57344 (E5M2)."""
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


def fp8_quantize_weight(
    weight: torch.Tensor, fmt: Fp8Format, scale_mode: ScaleMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (N, K) FP8 codes and float32 scales, (N, 1) or (1, 1): ``w ≈ w8 · s``.

    ``s = max|w| / fp8_max`` over the row (``"channel"``) or the tensor, so the largest
    magnitude lands on the format's largest finite value; all-zero rows get ``s = 1``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fp8.format: {fmt!r} is not one of {', '.join(map(repr, FP8_DTYPES))}")
    w = weight.detach().float()
    top = fp8_max(fmt)
    amax = w.abs().amax(dim=1, keepdim=True) if scale_mode == "channel" else w.abs().amax()
    scale = (amax / top).reshape(-1, 1)  # (N, 1) or (1, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Clamp before the cast: E4M3fn has no infinity (overflow gives NaN), E5M2 would give inf.
    w8 = torch.clamp(w / scale, -top, top).to(FP8_DTYPES[fmt])
    return w8, scale


def fp8_dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in ``dtype`` from FP8 codes and (N, 1) or (1, 1) scales."""
    return (w8.to(torch.float32) * scale).to(dtype)


def _scaled_mm_ok(layer: Fp8Linear, x: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` can run this call (CUDA, sm_89+, aligned, E4M3)."""
    if x.device.type != "cuda" or layer.format != "e4m3" or not hasattr(torch, "_scaled_mm"):
        return False
    if layer.in_features % _MM_ALIGN or layer.out_features % _MM_ALIGN:
        return False
    major_minor = torch.cuda.get_device_capability(x.device)
    if major_minor < (8, 9) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if layer.scale.shape[0] == 1:  # per-tensor scales: every FP8-capable GPU
        return True
    return major_minor >= (9, 0) and x.dtype == torch.bfloat16  # row-wise scales


def _scaled_mm_linear(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """``x · (w8·s)ᵀ + b`` on FP8 tensor cores, ``x`` quantized to E4M3 per tensor or row.
    ``forward`` calls it on CUDA only; the suite runs it through torch's CPU ``_scaled_mm``
    (torch 2.13 has one) against the textbook product."""
    top = fp8_max("e4m3")
    x2 = x.reshape(-1, layer.in_features)  # (M, K)
    if layer.scale.shape[0] == 1:
        x_scale = (x2.abs().amax().float() / top).clamp_min(1e-12)  # () per tensor
        w_scale = layer.scale.reshape(())
    else:
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / top).clamp_min(1e-12)  # (M, 1)
        w_scale = layer.scale.reshape(1, -1)  # (1, N)
    x8 = torch.clamp(x2.float() / x_scale, -top, top).to(torch.float8_e4m3fn).contiguous()
    out = torch._scaled_mm(
        x8, layer.weight_fp8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype
    )  # (M, N); weight (N, K) row-major is the column-major (K, N) operand required
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)


@register_module
class Fp8Linear(LogicalWeightCounts, nn.Module):
    """``y = x · (w8 · s)ᵀ + b`` with the weight held in FP8.

    Buffers: ``weight_fp8`` (N, K) ``float8_e4m3fn``/``float8_e5m2``, ``scale`` (N, 1) or
    (1, 1) float32, ``bias`` (N,) when the original layer had one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        format: Fp8Format = "e4m3",
        scale_mode: ScaleMode = "channel",
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format: Fp8Format = format
        self.scale_mode: ScaleMode = scale_mode
        rows = out_features if scale_mode == "channel" else 1
        self.weight_fp8: torch.Tensor
        self.scale: torch.Tensor
        self.bias: torch.Tensor | None
        w8 = torch.zeros(out_features, in_features, dtype=FP8_DTYPES[format])
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("scale", torch.ones(rows, 1, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_float(cls, module: nn.Module, fmt: Fp8Format, scale_mode: ScaleMode) -> Fp8Linear:
        """Quantize an ``nn.Linear`` or GPT-2 ``Conv1D`` into a new layer."""
        weight = linear_weight(module).detach()  # (N, K), Conv1D transposed
        w8, scale = fp8_quantize_weight(weight, fmt, scale_mode)
        bias = getattr(module, "bias", None)
        layer = cls(
            weight.shape[1], weight.shape[0], format=fmt, scale_mode=scale_mode,
            bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
        )  # fmt: skip
        layer.weight_fp8 = w8.contiguous()
        layer.scale = scale
        layer.bias = None if bias is None else bias.detach().clone()
        return layer.to(weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight this layer computes with on the upcast path."""
        return fp8_dequantize(self.weight_fp8, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _scaled_mm_ok(self, x):
            return _scaled_mm_linear(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format}, scale={self.scale_mode}, bias={self.bias is not None}"
        )

    def slimline_meta(self) -> dict[str, Any]:
        return {
            "version": META_VERSION,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "format": self.format,
            "scale_mode": self.scale_mode,
            "bias": self.bias is not None,
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None
            else "float32",
        }  # fmt: skip

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> nn.Module:
        if meta.get("version") != META_VERSION:
            raise ValueError(f"Fp8Linear metadata version {meta.get('version')!r} unsupported")
        fmt, mode, bias_dtype = meta.get("format"), meta.get("scale_mode"), meta.get("bias_dtype")
        if fmt not in FP8_DTYPES or mode not in ("channel", "tensor"):
            raise ValueError(f"Fp8Linear metadata has format {fmt!r}, scale_mode {mode!r}")
        if bias_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Fp8Linear metadata has unsupported bias dtype {bias_dtype!r}")
        return cls(
            int(meta["in_features"]), int(meta["out_features"]), format=fmt, scale_mode=mode,
            bias=bool(meta["bias"]), bias_dtype=_FLOAT_DTYPES[bias_dtype],
        )  # fmt: skip


@register(Fp8Config)
def apply_fp8(model: nn.Module, cfg: Fp8Config, ctx: StepContext) -> StepOutcome:
    """Replace every selected Linear/Conv1D layer of ``model`` by an :class:`Fp8Linear`."""
    names = []
    for name, module in cfg.select_modules(model):
        model.set_submodule(name, Fp8Linear.from_float(module, cfg.format, cfg.scale))
        names.append(name)
    notes = [f"{len(names)} layers to fp8 {cfg.format}, {cfg.scale} scales"]
    return StepOutcome(modules=names, notes=notes)
