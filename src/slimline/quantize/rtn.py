"""``rtn``: weight-only round-to-nearest quantization, int2 to int8, packed.

Every Linear-like layer's weight is rounded to the nearest point of a uniform grid, with one
scale (and, when asymmetric, one zero point) per group of ``group_size`` input weights of a
row. No calibration data: it is the baseline that GPTQ (arXiv 2210.17323) and AWQ
(arXiv 2306.00978) improve on, and at 8 bits, or 4 bits with groups of 128, it is often all
a model needs (Dettmers & Zettlemoyer, arXiv 2212.09720).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.quantize.packing import MAX_BITS, MIN_BITS
from slimline.quantize.qlinear import QuantLinear


@dataclass(frozen=True, kw_only=True)
class RtnConfig(MethodConfig):
    """Weight-only round-to-nearest quantization."""

    method: ClassVar[str] = "rtn"
    family: ClassVar[Family] = Family.QUANTIZE
    needs_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = "weight-only round-to-nearest, int2–int8, per-group scales, packed"
    paper: ClassVar[str] = "RTN baseline (GPTQ arXiv 2210.17323; arXiv 2212.09720)"

    # 4 bits with groups of 128 is the usual sweet spot for LLM weights: about 0.13× the
    # float32 bytes with a small loss; 8 bits is near lossless, 2–3 bits need GPTQ/AWQ.
    bits: int = 4
    # Scales per 128 input weights bound the damage of outliers to their group; None gives one
    # scale per output channel (smaller, less accurate below 8 bits).
    group_size: int | None = 128
    # A grid centred on zero needs no zero points; asymmetric fits skewed groups better.
    symmetric: bool = True

    def check(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            self.fail("bits", f"must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            self.fail("group_size", f"must be a positive integer or null, got {self.group_size}")


def quantize_module(module: nn.Module, cfg: RtnConfig) -> QuantLinear:
    """The RTN-quantized replacement of one Linear-like layer."""
    return QuantLinear.from_float(
        module, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric
    )


@register(RtnConfig)
def apply_rtn(model: nn.Module, cfg: RtnConfig, ctx: StepContext) -> StepOutcome:
    """Replace every selected Linear/Conv1D layer of ``model`` by a :class:`QuantLinear`."""
    names = []
    for name, module in cfg.select_modules(model):
        model.set_submodule(name, quantize_module(module, cfg))
        names.append(name)
    group = "per-channel" if cfg.group_size is None else f"groups of {cfg.group_size}"
    sign = "symmetric" if cfg.symmetric else "asymmetric"
    notes = [f"{len(names)} layers to int{cfg.bits}, {group}, {sign}"]
    return StepOutcome(modules=names, notes=notes)
