"""What a search optimises and what it must respect: objectives and constraints on metrics.

Every name maps to a figure of ``slimline.evaluate``'s report (ARCHITECTURE.md, "Evaluation
report"). Timing figures (latency, throughput, energy) are used as the ratio of the trial's
model to the baseline measured in the same ``evaluate`` call, interleaved (MEASURING.md:
absolute times from different moments of a shared machine are not comparable); the others are
the model's own figure. Constraints read ``metric<=value`` or ``metric>=value``; a value with
``%`` is relative to the baseline (``perplexity<=+2%``: at most 2 % above the baseline's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Op = Literal["<=", ">="]


@dataclass(frozen=True)
class Metric:
    """A searchable metric: its report key, evaluator metric, direction and kind."""

    name: str
    key: str  # per-model key of the evaluate report
    higher_is_better: bool
    quality: bool = False  # measured by the quality pass (cheap on a slice of the data)
    pairwise: bool = False  # measured against the baseline: the baseline has no value of its own
    timing: bool = False  # a ratio to the baseline timed in the same evaluate call

    @property
    def evaluator_metric(self) -> str:
        return "agreement" if self.name == "agreement" else self.name

    def value(self, figures: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
        """The figure this metric is optimised on (a ratio for timing metrics)."""
        own = _figure(figures, self.key, self.name)
        if not self.timing:
            return own
        return own / _figure(baseline, self.key, f"baseline {self.name}")

    def relative(self, figures: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
        """The figure as a ratio to the original's, oriented so that lower is better and the
        original scores 1: latency × baseline, size / baseline size, baseline throughput /
        throughput, 1 / cosine (the original's cosine to itself is 1). Used to put several
        objectives on one scale (hypervolume); kl has no ratio (the original's is 0)."""
        if self.name == "kl":
            raise ValueError("kl has no ratio to the original (the original's kl is 0)")
        if self.pairwise:
            own = 1.0 / _figure(figures, self.key, self.name)
        elif self.timing:
            own = self.value(figures, baseline)
            own = 1.0 / own if self.higher_is_better else own
        else:
            ratio = _figure(figures, self.key, self.name) / _figure(
                baseline, self.key, f"baseline {self.name}")
            own = 1.0 / ratio if self.higher_is_better else ratio
        return own

    def minimised(self, value: float) -> float:
        """``value`` turned into a quantity to minimise (Pareto dominance is on these)."""
        return -value if self.higher_is_better else value


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("latency", "latency_ms_median", False, timing=True),
    Metric("throughput", "throughput_items_per_s", True, timing=True),
    Metric("size", "size_bytes_disk", False),
    Metric("memory", "peak_memory_bytes", False),
    Metric("energy", "energy_kwh", False, timing=True),
    Metric("flops", "flops", False),
    Metric("perplexity", "perplexity", False, quality=True),
    Metric("accuracy", "accuracy", True, quality=True),
    Metric("cosine", "cosine", True, quality=True, pairwise=True),
    Metric("kl", "kl", False, quality=True, pairwise=True),
    Metric("agreement", "top1_agreement", True, quality=True, pairwise=True),
)}  # fmt: skip


def metric(name: str) -> Metric:
    """The metric called ``name``; ValueError listing the valid names."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}") from None


def parse_objectives(names: Sequence[str] | str) -> tuple[Metric, ...]:
    """Objective names (a list, or one comma-separated string) as metrics, checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError("objectives: name at least one metric, e.g. ['latency', 'size']")
    found = tuple(metric(n) for n in names)
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ValueError(f"objectives: {twice} named more than once")
    return found


_CONSTRAINT = re.compile(
    r"^\s*(?P<name>[a-z_0-9]+)\s*(?P<op><=|>=|<|>|==|=)\s*"
    r"(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<pct>%)?\s*$"
)


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``; ``relative``: the bound is ``baseline × (1 + value)``."""

    metric: Metric
    op: Op
    value: float
    relative: bool
    text: str

    def bound(self, baseline: Mapping[str, Any]) -> float:
        if not self.relative:
            return self.value
        if self.metric.timing:  # the figure is already a ratio to the baseline
            return 1.0 + self.value
        return _figure(baseline, self.metric.key, f"baseline {self.metric.name}") * (
            1.0 + self.value)

    def measured(self, figures: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
        """The figure compared with the bound: a timing ratio when relative, else the model's."""
        if self.metric.timing and self.relative:
            return self.metric.value(figures, baseline)
        return _figure(figures, self.metric.key, self.metric.name)

    def violation(self, figures: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
        """How far the model is past the bound, as a fraction of it (<= 0: met)."""
        bound = self.bound(baseline)
        measured = self.measured(figures, baseline)
        over = measured - bound if self.op == "<=" else bound - measured
        return over / max(abs(bound), 1e-12)

    def __str__(self) -> str:
        return self.text


def parse_constraint(text: str) -> Constraint:
    """``"cosine>=0.99"``, ``"latency<=5"`` (ms), ``"perplexity<=+2%"``, ``"size<=-50%"``."""
    if not isinstance(text, str):
        raise TypeError(f"constraint: expected a string such as 'cosine>=0.99', got {text!r}")
    match = _CONSTRAINT.match(text)
    if match is None:
        raise ValueError(f"constraint {text!r} does not parse: write metric<=value or "
                         "metric>=value, e.g. 'cosine>=0.99' or 'perplexity<=+2%'")
    if match["op"] not in ("<=", ">="):
        raise ValueError(f"constraint {text!r}: use <= or >= (got {match['op']})")
    op: Op = "<=" if match["op"] == "<=" else ">="
    found = metric(match["name"])
    relative = match["pct"] is not None
    value = float(match["num"]) / (100.0 if relative else 1.0)
    if relative and found.pairwise:
        raise ValueError(f"constraint {text!r}: {found.name} is measured against the baseline, "
                         f"which has none of its own; give an absolute bound "
                         f"(e.g. {found.name}>=0.99)")
    if relative and value <= -1.0:
        raise ValueError(f"constraint {text!r}: a change of {match['num']}% leaves nothing")
    canonical = f"{found.name}{op}{match['num']}{'%' if relative else ''}"
    return Constraint(found, op, value, relative, canonical)


def parse_constraints(texts: Sequence[str] | str | None) -> tuple[Constraint, ...]:
    if texts is None:
        return ()
    if isinstance(texts, str):
        texts = [texts]
    return tuple(parse_constraint(t) for t in texts)


def _figure(figures: Mapping[str, Any], key: str, what: str) -> float:
    value = figures.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{what} was not measured (no {key!r} in the report)")
    return float(value)
