"""The fields every weight-only integer quantizer shares: the grid, and mixed precision.

:class:`WeightGridConfig` is the uniform grid of :mod:`slimline.quantize.packing` — ``bits``,
``group_size``, ``symmetric`` — that ``rtn``, ``gptq``, ``hqq``, ``awq`` and ``qat`` all
store in a :class:`~slimline.quantize.qlinear.QuantLinear`. :class:`MixedWidthConfig` adds
the per-layer widths of :mod:`slimline.quantize.mixed` (HAWQ-V3, arXiv 2011.10680), which only
the methods that quantize each layer on its own can use (``rtn``, ``gptq``, ``hqq``): a method
that cannot mix widths takes the grid alone instead of inheriting fields it would refuse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.quantize.packing import MAX_BITS, MIN_BITS
from slimline.quantize.qlinear import DECODE_ACTIVATIONS

G = TypeVar("G", bound="WeightGridConfig")
M = TypeVar("M", bound="MixedWidthConfig")


@dataclass(frozen=True, kw_only=True)
class WeightGridConfig(MethodConfig):
    """Weight-only quantization to a uniform grid with per-group scales (no method of its own)."""

    family: ClassVar[Family] = Family.QUANTIZE

    # 4 bits with groups of 128 is the usual sweet spot for LLM weights: about 0.13× the
    # float32 bytes with a small loss; 8 bits is near lossless, 2–3 bits need GPTQ/AWQ.
    bits: int = 4
    # Scales per 128 input weights bound the damage of outliers to their group; None gives one
    # scale per output channel (smaller, less accurate below 8 bits).
    group_size: int | None = 128
    # A grid centred on zero needs no zero points; asymmetric fits skewed groups better.
    symmetric: bool = True
    # How decode-sized calls (batch-1 generation) take the activations: "float" keeps them in
    # float32 (the exact product with the quantized weight); "int8" rounds them to int8 in
    # blocks of 32, as llama.cpp does for its Q4_0/Q8_0 layers, and sums in integers (AVX-512
    # VNNI or AVX2) — faster decode for a rounding of x (BENCHMARKS.md "Batch-1 greedy decode").
    # Needs rows and groups in whole blocks of 32; elsewhere float is kept, with a warning.
    decode_activations: str = "float"

    def check(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            self.fail("bits", f"must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            self.fail("group_size", f"must be a positive integer or null, got {self.group_size}")
        if self.decode_activations not in DECODE_ACTIVATIONS:
            self.fail(
                "decode_activations",
                f"must be one of {list(DECODE_ACTIVATIONS)}, got {self.decode_activations!r}",
            )

    @classmethod
    def from_dict(cls: type[G], data: dict[str, Any]) -> G:
        """As :meth:`MethodConfig.from_dict`; a grid-only method (``awq``, ``qat``) also reads
        recipes saved with checkpoints while it carried rtn's mixed-precision fields unused
        (``average_bits`` null and ``bit_choices``): those two are dropped. Any other use of
        them is an unknown field."""
        own = {f.name for f in dataclasses.fields(cls)}
        legacy = data.get("average_bits", ...) is None and "bit_choices" in data
        if legacy and "average_bits" not in own:
            data = {k: v for k, v in data.items() if k not in ("average_bits", "bit_choices")}
        return super().from_dict(data)

    def nominal_overhead(self) -> float:
        """Scale and zero-point bits per weight with float16 scales and full groups."""
        if self.group_size is None:
            return 0.0  # one scale per row: depends on the layer's width, checked on the model
        return (16 + (0 if self.symmetric else 8)) / self.group_size


@dataclass(frozen=True, kw_only=True)
class MixedWidthConfig(WeightGridConfig):
    """The grid, and optionally one width per layer under a budget of stored bits."""

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
        super().check()
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

    def with_bits(self: M, bits: int) -> M:
        """This config for a single width (how a mixed plan quantizes each layer)."""
        return dataclasses.replace(self, bits=bits, average_bits=None)
