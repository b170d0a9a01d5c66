"""What a search found: every trial with its recipe and report, the Pareto front, the best.

The front is computed here, from the trials as stored (so a result read back from the study
or its JSON gives the same front): among the feasible complete trials, those that no other
trial dominates — at least as good on every objective and better on one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimline.core.recipe import Recipe
from slimline.search.objectives import (
    Constraint,
    Metric,
    metric,
    parse_constraints,
)

if TYPE_CHECKING:
    from slimline.search.energy_rating import EnergyRating

CLOSEST_SHOWN = 3


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its state, recipe, objective values, constraint violations and report."""

    number: int
    state: str  # "complete", "pruned", "failed" or "running"
    recipe: Mapping[str, Any] | None
    values: tuple[float, ...] | None = None  # one per objective, as the metrics define them
    violations: tuple[float, ...] = ()  # one per constraint, relative; <= 0 means met
    report: Mapping[str, Any] | None = None
    note: str | None = None  # why it was pruned, or the error it failed with
    worker: str | None = None  # "host:pid" of the process that ran it
    retry_of: int | None = None  # the trial whose worker died, run again as this one

    @property
    def feasible(self) -> bool:
        return self.state == "complete" and all(v <= 0 for v in self.violations)

    @property
    def total_violation(self) -> float:
        return sum(max(v, 0.0) for v in self.violations)

    def to_recipe(self) -> Recipe:
        if self.recipe is None:
            raise ValueError(f"trial {self.number} has no recipe")
        return Recipe.from_dict(dict(self.recipe))

    def figures(self) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """The model's and the baseline's figures from the trial's report."""
        models = (self.report or {}).get("models", {})
        return models.get("model", {}), models.get("baseline", {})

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "feasible": self.feasible,
                "recipe": self.recipe, "values": list(self.values) if self.values else None,
                "violations": list(self.violations), "note": self.note, "worker": self.worker,
                "retry_of": self.retry_of, "report": self.report}


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` (all minimised) and bounded by ``reference``
    (Zitzler & Thiele 1998, the S metric; doi:10.1007/BFb0056872): sliced along the last
    axis, each slab the (d-1)-volume of the points at or below it. Points not strictly better
    than the reference everywhere add nothing. Exact; fine for the fronts of a search."""
    d = len(reference)
    inside = sorted((list(p) for p in points
                     if len(p) == d and all(x < r for x, r in zip(p, reference, strict=True))),
                    key=lambda p: p[-1])
    if not inside:
        return 0.0
    if d == 1:
        return reference[0] - inside[0][0]
    total = 0.0
    for i, point in enumerate(inside):
        top = inside[i + 1][-1] if i + 1 < len(inside) else reference[-1]
        if top > point[-1]:
            total += (top - point[-1]) * hypervolume([q[:-1] for q in inside[: i + 1]],
                                                     reference[:-1])
    return total


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` (both minimised): no worse anywhere and better somewhere."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True))


@dataclass
class SearchResult:
    """The trials of a study (this run's and earlier ones'), read as a Pareto front."""

    study: str
    objectives: tuple[Metric, ...]
    constraints: tuple[Constraint, ...]
    trials: list[TrialRecord]
    space: list[str] = field(default_factory=list)
    storage: str | None = None
    energy: EnergyRating | None = None  # set by search(energy_rating=True) or rate_energy

    def _minimised(self, trial: TrialRecord) -> list[float]:
        if trial.values is None:
            raise ValueError(f"trial {trial.number} has no objective values ({trial.state})")
        return [m.minimised(v) for m, v in zip(self.objectives, trial.values, strict=True)]

    @property
    def feasible_trials(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.feasible and t.values is not None]

    @property
    def feasible(self) -> bool:
        """Whether any trial met every constraint."""
        return bool(self.feasible_trials)

    @property
    def pareto(self) -> list[TrialRecord]:
        """The feasible trials no other feasible trial dominates, best first objective first."""
        pool = self.feasible_trials
        points = [self._minimised(t) for t in pool]
        front = [t for t, p in zip(pool, points, strict=True)
                 if not any(dominates(q, p) for q in points)]
        return sorted(front, key=self._minimised)

    @property
    def closest(self) -> list[TrialRecord]:
        """When no trial is feasible: those nearest to the constraints (least total relative
        violation), pruned ones included — their violation is what the slice showed."""
        judged = [t for t in self.trials if t.state in ("complete", "pruned") and t.violations]
        return sorted(judged, key=lambda t: (t.total_violation, t.number))[:CLOSEST_SHOWN]

    def best(self, constraint: str | Sequence[str] | None = None, *,
             objective: str | None = None) -> Recipe:
        """The recipe best on ``objective`` (default: the first) among the feasible trials that
        also meet ``constraint`` (e.g. ``"cosine>=0.995"``); ties go to the next objectives.
        ValueError when no trial qualifies."""
        extra = parse_constraints(constraint)
        order = self._objective_order(objective)
        pool = [t for t in self.feasible_trials if all(_meets(c, t) for c in extra)]
        if not pool:
            what = " and ".join(str(c) for c in (*self.constraints, *extra)) or "feasible"
            raise ValueError(f"no trial of study {self.study!r} meets {what}")
        best = min(pool, key=lambda t: [self._minimised(t)[i] for i in order])
        return best.to_recipe()

    def _objective_order(self, objective: str | None) -> list[int]:
        names = [m.name for m in self.objectives]
        if objective is None:
            return list(range(len(names)))
        if objective not in names:
            metric(objective)  # unknown names get the full list
            raise ValueError(f"{objective!r} is not an objective of this search ({names})")
        first = names.index(objective)
        return [first, *(i for i in range(len(names)) if i != first)]

    def relative_front(self) -> list[list[float]]:
        """The front's objectives as ratios to the original's, lower better (the original at
        1 on every axis; ``Metric.relative``)."""
        out = []
        for t in self.pareto:
            figures, baseline = t.figures()
            out.append([m.relative(figures, baseline) for m in self.objectives])
        return out

    def hypervolume(self, reference: float | Sequence[float] = 1.0) -> float:
        """Hypervolume of the front in :meth:`relative_front` units, bounded by ``reference``
        (one ratio per objective, or one for all: 1.0 counts only what beats the original on
        every objective). Comparable between searches of the same model and objectives."""
        ref = [float(reference)] * len(self.objectives) if isinstance(reference, (int, float)) \
            else [float(r) for r in reference]
        if len(ref) != len(self.objectives):
            raise ValueError(f"hypervolume: {len(ref)} reference values for "
                             f"{len(self.objectives)} objectives")
        return hypervolume(self.relative_front(), ref)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        out["feasible"] = len(self.feasible_trials)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "objectives": [m.name for m in self.objectives],
            "constraints": [str(c) for c in self.constraints],
            "space": self.space,
            "counts": self.counts(),
            "feasible": self.feasible,
            "pareto": [t.number for t in self.pareto],
            "closest": [] if self.feasible else [t.number for t in self.closest],
            "energy_rating": self.energy.to_dict() if self.energy is not None else None,
            "trials": [t.to_dict() for t in self.trials],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        from slimline.search.render import markdown

        return markdown(self)

    def write(self, out: str | Path) -> list[Path]:
        """Write the front to ``out``: one YAML recipe per Pareto trial (the closest when none
        is feasible), ``search.json``, ``pareto.md`` and ``pareto.png`` (when matplotlib is
        installed; otherwise the Markdown says why it is missing)."""
        from slimline.search.render import write_all

        return write_all(self, Path(out))


def _meets(constraint: Constraint, trial: TrialRecord) -> bool:
    figures, baseline = trial.figures()
    try:
        return constraint.violation(figures, baseline) <= 0
    except ValueError:  # the metric was not measured in this search
        raise ValueError(f"constraint {constraint}: {constraint.metric.name} was not measured "
                         "in this search; constrain an objective or a searched constraint's "
                         "metric") from None
