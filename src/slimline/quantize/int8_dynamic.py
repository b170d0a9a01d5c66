"""``int8_dynamic``: W8A8 with per-token dynamic activation scales, on an int8 GEMM.

Weights are int8 with one scale per output channel, fixed at compression time; activations
are quantized to int8 at run time with one scale per token, so no calibration is needed and
an outlier token only coarsens its own row. The product runs on a real int8 matmul with int32
accumulation (oneDNN's u8·s8 GEMM on x86 CPUs, ``torch._int_mm`` elsewhere) and is rescaled
as ``acc · s_x[:, None] · s_w[None, :] + bias``. This is the vector-wise quantization of
LLM.int8() (arXiv 2208.07339) without its fp16 outlier split, and SmoothQuant's per-token
dynamic W8A8 setting (arXiv 2211.10438) without its smoothing (a ``smoothquant`` step can
run first for models with activation outliers).

On x86 CPUs without VNNI (or AMX) the activations get 7 bits instead of 8: their int8 GEMM adds
pairs of u8·s8 products into a saturating int16, which 8-bit codes can overflow (PyTorch's
``reduce_range`` for the same reason). The width is stored in each layer, so a checkpoint
computes the same numbers on every machine (see :class:`Int8DynamicLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.quantize import kernels_int8 as kernels
from slimline.quantize.w8a8 import Int8DynamicLinear
from slimline.search.ranges import SearchSpace


@dataclass(frozen=True, kw_only=True)
class Int8DynamicConfig(MethodConfig):
    """Dynamic int8 weights-and-activations quantization (W8A8)."""

    method: ClassVar[str] = "int8_dynamic"
    family: ClassVar[Family] = Family.QUANTIZE
    needs_calibration: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    summary: ClassVar[str] = "int8 weights per channel, int8 activations per token, int8 GEMM"
    paper: ClassVar[str] = "LLM.int8() arXiv 2208.07339; SmoothQuant arXiv 2211.10438"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {}


@register(Int8DynamicConfig)
def apply_int8_dynamic(model: nn.Module, cfg: Int8DynamicConfig, ctx: StepContext) -> StepOutcome:
    """Replace every selected Linear/Conv1D layer by an :class:`Int8DynamicLinear`."""
    names = []
    for name, module in cfg.select_modules(model):
        model.set_submodule(name, Int8DynamicLinear.from_float(module))
        names.append(name)
    return StepOutcome(
        modules=names, notes=[f"{len(names)} layers to W8A8 on {kernels.w8a8_kernel_note()}"]
    )
