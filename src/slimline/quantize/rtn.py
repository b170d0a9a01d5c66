"""``rtn``: weight-only round-to-nearest quantization, int2 to int8, packed.

Every Linear-like layer's weight is rounded to the nearest point of a uniform grid, with one
scale (and, when asymmetric, one zero point) per group of ``group_size`` input weights of a
row. No calibration data: it is the baseline that GPTQ (arXiv 2210.17323) and AWQ
(arXiv 2306.00978) improve on, and at 8 bits, or 4 bits with groups of 128, it is often all
a model needs (Dettmers & Zettlemoyer, arXiv 2212.09720).

With ``average_bits`` set, each layer gets its own width from ``bit_choices``, chosen by
measured sensitivity under that budget of stored bits per weight (HAWQ-V3, arXiv 2011.10680;
see :mod:`slimline.quantize.mixed`); ``gptq`` and ``hqq`` inherit the same two fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from torch import nn

from slimline.core.batches import Batch
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.quantize.mixed import BitPlan, Quantizer, layer_stored_bits, plan_bits
from slimline.quantize.packing import MAX_BITS, MIN_BITS, quantize_groups
from slimline.quantize.qlinear import QuantLinear

R = TypeVar("R", bound="RtnConfig")


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
    # Mixed precision: a budget in *stored* bits per weight — packed codes plus scales and
    # zero points, so uniform 4-bit g128 with float16 scales is 4.125 — shared out over the
    # layers by measured sensitivity (Hessian-weighted when calibration data is given, plain
    # weight error otherwise). Each layer gets a width from ``bit_choices``; ``bits`` is then
    # unused and must stay at its default. None: every layer at ``bits``.
    average_bits: float | None = None
    # Widths a layer may get. 8 bits protects the few layers that need it at one stroke (on
    # code-llama-tiny the small key/value projections). 2 bits is left out by default: the
    # second-order sensitivity is least trustworthy at such large errors, and on
    # code-llama-tiny adding it helped rtn (3.5 bits: +0.83% perplexity, not +1.01%) but not
    # gptq (+0.21%, not +0.08%); list it to try.
    bit_choices: tuple[int, ...] = (3, 4, 8)

    def check(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            self.fail("bits", f"must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            self.fail("group_size", f"must be a positive integer or null, got {self.group_size}")
        self._check_mixed()

    def _check_mixed(self) -> None:
        choices = self.bit_choices
        if not choices:
            self.fail("bit_choices", "must list at least one width")
        if any(not MIN_BITS <= b <= MAX_BITS for b in choices):
            limits = f"between {MIN_BITS} and {MAX_BITS}"
            self.fail("bit_choices", f"widths must be {limits}, got {list(choices)}")
        if len(set(choices)) != len(choices):
            self.fail("bit_choices", f"lists a width twice: {list(choices)}")
        if self.average_bits is None:
            return
        default = next(f.default for f in dataclasses.fields(self) if f.name == "bits")
        if self.bits != default:
            self.fail("bits", f"is set per layer when average_bits is given: leave it at {default}")
        low, high = min(choices) + self.nominal_overhead(), max(choices) + self.nominal_overhead()
        if not low <= self.average_bits <= high:
            self.fail(
                "average_bits",
                f"{self.average_bits:g} is outside [{low:g}, {high:g}], the stored bits per weight "
                f"of {min(choices)} and {max(choices)} bits with these groups and float16 scales",
            )

    def nominal_overhead(self) -> float:
        """Scale and zero-point bits per weight with float16 scales and full groups."""
        if self.group_size is None:
            return 0.0  # one scale per row: depends on the layer's width, checked on the model
        return (16 + (0 if self.symmetric else 8)) / self.group_size

    def with_bits(self: R, bits: int) -> R:
        """This config for a single width (how a mixed plan quantizes each layer)."""
        return dataclasses.replace(self, bits=bits, average_bits=None)


def quantize_module(module: nn.Module, cfg: RtnConfig) -> QuantLinear:
    """The RTN-quantized replacement of one Linear-like layer."""
    return QuantLinear.from_float(
        module, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric
    )


def rtn_quantizer(cfg: RtnConfig) -> Quantizer:
    """``(weight, bits) -> (codes, scales, zeros)`` on ``cfg``'s round-to-nearest grid."""
    return lambda w, bits, _hessian: quantize_groups(w, bits, cfg.group_size, cfg.symmetric)


def choose_widths(
    model: nn.Module,
    layers: dict[str, nn.Module],
    cfg: RtnConfig,
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
    model: nn.Module, names: list[str], cfg: RtnConfig, plan: BitPlan | None, detail: str
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
