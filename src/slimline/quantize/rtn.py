"""``rtn``: weight-only round-to-nearest quantization, int2 to int8, packed.

Every Linear-like layer's weight is rounded to the nearest point of a uniform grid, with one
scale (and, when asymmetric, one zero point) per group of ``group_size`` input weights of a
row. No calibration data: it is the baseline that GPTQ (arXiv 2210.17323) and AWQ
(arXiv 2306.00978) improve on, and at 8 bits, or 4 bits with groups of 128, it is often all
a model needs (Dettmers & Zettlemoyer, arXiv 2212.09720).

With ``average_bits`` set, each layer gets its own width from ``bit_choices``, chosen by
measured sensitivity under that budget of stored bits per weight (HAWQ-V3, arXiv 2011.10680;
see :mod:`slimline.quantize.mixed`); ``gptq`` and ``hqq`` share the same two fields
(:class:`~slimline.quantize.weight_only.MixedWidthConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from slimline.core.batches import Batch
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.quantize.mixed import BitPlan, layer_stored_bits, plan_bits
from slimline.quantize.mixed_sensitivity import Quantizer
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.weight_only import MixedWidthConfig, WeightGridConfig
from slimline.search.ranges import Choice, SearchSpace


@dataclass(frozen=True, kw_only=True)
class RtnConfig(MixedWidthConfig):
    """Weight-only round-to-nearest quantization (fields and their defaults: the bases)."""

    method: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = "weight-only round-to-nearest, int2–int8, per-group scales, packed"
    paper: ClassVar[str] = "RTN baseline (GPTQ arXiv 2210.17323; arXiv 2212.09720)"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {
        "bits": Choice(3, 4, 8),
        "group_size": Choice(32, 64, 128, None),
    }


def quantize_module(module: nn.Module, cfg: WeightGridConfig) -> QuantLinear:
    """The RTN-quantized replacement of one Linear-like layer."""
    return QuantLinear.from_float(
        module, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
        decode_activations=cfg.decode_activations,
    )  # fmt: skip


def rtn_quantizer(cfg: WeightGridConfig) -> Quantizer:
    """``(weight, bits) -> (codes, scales, zeros)`` on ``cfg``'s round-to-nearest grid."""
    return lambda w, bits, _hessian: quantize_groups(w, bits, cfg.group_size, cfg.symmetric)


def choose_widths(
    model: nn.Module,
    layers: dict[str, nn.Module],
    cfg: MixedWidthConfig,
    quantize: Quantizer,
    calibration: Sequence[Batch] | None,
    progress: bool = False,
) -> BitPlan | None:
    """The mixed-precision plan for ``cfg.average_bits``, or None for one width everywhere."""
    if cfg.average_bits is None:
        return None
    return plan_bits(
        model, layers, quantize, average_bits=cfg.average_bits, bit_choices=cfg.bit_choices,
        group_size=cfg.group_size, calibration=calibration, step=cfg.method, progress=progress,
    )  # fmt: skip


def width_note(
    model: nn.Module, names: list[str], cfg: MixedWidthConfig, plan: BitPlan | None, detail: str
) -> str:
    """``"14 layers to int4, groups of 128, <detail>"``, or the mixed plan as realised."""
    group = "per-channel" if cfg.group_size is None else f"groups of {cfg.group_size}"
    if plan is None:
        return f"{len(names)} layers to int{cfg.bits}, {group}, {detail}"
    realised = sum(layer_stored_bits(model.get_submodule(n)) for n in names)
    return f"{len(names)} layers, {group}, {detail}; {plan.describe(realised)}"


@register(RtnConfig)
def apply_rtn(model: nn.Module, cfg: RtnConfig, ctx: StepContext) -> StepOutcome:
    """Replace every selected Linear/Conv1D layer of ``model`` by a :class:`QuantLinear`."""
    layers = dict(cfg.select_modules(model))
    plan = choose_widths(model, layers, cfg, rtn_quantizer(cfg), ctx.calibration, ctx.progress)
    for name, module in layers.items():
        bits = cfg.bits if plan is None else plan.widths[name]
        model.set_submodule(name, quantize_module(module, cfg.with_bits(bits)))
    sign = "symmetric" if cfg.symmetric else "asymmetric"
    note = width_note(model, list(layers), cfg, plan, sign)
    return StepOutcome(modules=list(layers), notes=[note])
