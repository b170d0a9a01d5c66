"""``search``: sample recipes, compress, measure cheap figures first, and keep the front.

Each trial: sample a recipe from the space → ``compress`` → quality on a small slice of the
data against the original (a trial that already breaks a quality constraint there is pruned
before anything slow is timed) → ``evaluate`` on all the data, the original measured beside
it in the same call (latency interleaved). The trial's report, recipe and constraint
violations are stored in the study as user attributes; a trial that raises is recorded as
failed with its reason, and the study goes on.

A pruned trial is told to Optuna as *complete*, with the violations the slice showed and
placeholder objective values (the slice's figure for a quality objective, the original's for
the rest), and slimline reads it back as pruned (``study.records``). Optuna's genetic samplers
build their populations from complete trials only: a search whose early trials are all
pruned would otherwise never leave NSGA-II's random first generation. Constrained domination
(Deb et al. 2002) ranks an infeasible trial against any other by violation alone, so the
placeholders never make it look better than a measured trial.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimline.core.batches import Batch, materialize
from slimline.search.objectives import Constraint, Metric, parse_constraints, parse_objectives
from slimline.search.result import SearchResult
from slimline.search.space import Space, build_space
from slimline.search.study import (
    DEFAULT_STUDY,
    SamplerName,
    create_study,
    describe_url,
    import_optuna,
    open_storage,
    quiet,
    records,
)


def search(
    model: nn.Module,
    data: Iterable[object],
    *,
    calibration: Iterable[object] | None = None,
    training: Iterable[object] | None = None,
    objectives: Sequence[str] | str = ("latency", "size"),
    constraints: Sequence[str] | str | None = None,
    trials: int = 20,
    storage: str | None = None,
    study: str | None = None,
    space: Mapping[str, Any] | str | Path | None = None,
    seed: int = 0,
    quality_batches: int = 1,
    runs: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    population: int | None = None,
    worker: int = 0,
    sampler: SamplerName = "nsga2",
    energy_rating: bool = False,
    warm_start: bool = True,
    progress: bool = False,
) -> SearchResult:
    """Search recipes for ``model``: the Pareto front of ``objectives`` under ``constraints``.

    ``data``: batches the trials are measured on (as for ``sl.evaluate``); ``calibration`` /
    ``training``: batches for the methods that need them — without them those methods are
    left out of the space. ``objectives``: metric names (latency, throughput, size, memory,
    energy, flops, perplexity, accuracy, cosine, kl, agreement); ``constraints``: e.g.
    ``"cosine>=0.99"``, ``"perplexity<=+2%"``. ``trials``: trials run by this call (a resumed
    study keeps its earlier ones). ``storage``/``study``: an Optuna database URL and study
    name (default: in memory). ``space``: a space file or mapping narrowing the methods.
    ``quality_batches``: the slice the cheap quality check runs on. ``runs``/``warmup``/
    ``threads``: as for ``sl.evaluate``. ``worker``: this process's number among the workers
    sharing ``study`` (each its own, so their samplers differ; see ``study.py``). ``sampler``:
    "nsga2" (default), or "random" — uniform sampling, to compare a search against.
    ``energy_rating``: afterwards, measure energy per 1,000 items of the original and each
    Pareto recipe together and rate them 1–5 stars (``result.energy``; relative to this
    front, see ``energy_rating.py``). ``warm_start``: the first trials (at most half of
    ``trials``) try each method alone at its defaults (``Space.single_methods``), queued by
    worker 0 once per study; NSGA-II's first generation is built from them (``False``: the
    sampler's own first trials, e.g. plain random search). Everything is
    checked before the first trial.
    """
    plan = _plan(model, data, calibration, training, objectives, constraints, trials, space,
                 quality_batches, energy_rating=energy_rating)
    if not isinstance(worker, int) or isinstance(worker, bool) or worker < 0:
        raise ValueError(f"search: worker must be an integer >= 0, got {worker!r}")
    if sampler not in ("nsga2", "random"):
        raise ValueError(f"search: sampler must be 'nsga2' or 'random', got {sampler!r}")
    optuna = import_optuna()
    db = open_storage(storage)
    name = study or DEFAULT_STUDY
    found = create_study(db, name, plan.objectives, plan.constraints, seed=seed,
                         population=population or _population(trials), worker=worker,
                         sampler=sampler)
    if warm_start and worker == 0:
        _enqueue_single_methods(found, plan.space, limit=max(1, trials // 2))
    trial_fn = _Trial(model, plan, runs=runs, warmup=warmup, threads=threads)
    with quiet(optuna), _progress(progress, trials, plan) as callback:
        found.optimize(trial_fn, n_trials=trials, catch=(Exception,), callbacks=[callback],
                       gc_after_trial=True)
    result = result_of(found, plan.objectives, plan.constraints, plan.space.describe(),
                       describe_url(storage))
    if energy_rating and result.feasible:
        from slimline.search.energy_rating import rate_energy

        result.energy = rate_energy(model, result, plan.data, calibration=plan.calibration,
                                    training=plan.training, threads=threads)
    return result


def worker_id() -> str:
    """``host:pid`` of this process, recorded in every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def load_search(storage: str, study: str) -> SearchResult:
    """Study ``study`` of ``storage`` read back as a result (one that other workers ran, or an
    earlier run): its objectives and constraints are those ``search`` stored with it."""
    optuna = import_optuna()
    db = open_storage(storage)
    with quiet(optuna):
        try:
            found = optuna.load_study(study_name=study, storage=db)
        except KeyError:
            raise ValueError(f"storage {describe_url(storage)} has no study {study!r}") from None
    if "objectives" not in found.user_attrs:
        raise ValueError(f"study {study!r} was not written by slimline's search")
    return result_of(found, parse_objectives(found.user_attrs["objectives"]),
                     parse_constraints(found.user_attrs["constraints"]), [],
                     describe_url(storage))


def result_of(study: Any, objectives: Sequence[Metric], constraints: Sequence[Constraint],
              space: list[str], storage: str | None) -> SearchResult:
    return SearchResult(study=study.study_name, objectives=tuple(objectives),
                        constraints=tuple(constraints), trials=records(study), space=space,
                        storage=storage)


@dataclass
class _Plan:
    """Everything checked before the first trial."""

    objectives: tuple[Metric, ...]
    constraints: tuple[Constraint, ...]
    space: Space
    data: list[Batch]
    calibration: list[Batch] | None
    training: list[Batch] | None
    quality_batches: int

    @property
    def measured(self) -> list[Metric]:
        out = list(self.objectives)
        out += [c.metric for c in self.constraints if c.metric not in out]
        return out

    @property
    def quality_constraints(self) -> list[Constraint]:
        return [c for c in self.constraints if c.metric.quality]


def _plan(model: nn.Module, data: Iterable[object], calibration: Iterable[object] | None,
          training: Iterable[object] | None, objectives: Sequence[str] | str,
          constraints: Sequence[str] | str | None, trials: int,
          space: Mapping[str, Any] | str | Path | None, quality_batches: int, *,
          energy_rating: bool = False) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"search: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"search: trials must be a positive integer, got {trials!r}")
    if quality_batches < 1:
        raise ValueError(f"search: quality_batches must be >= 1, got {quality_batches}")
    goals, limits = parse_objectives(objectives), parse_constraints(constraints)
    wants_energy = energy_rating or any(m.name == "energy"
                                        for m in (*goals, *(c.metric for c in limits)))
    if wants_energy and importlib.util.find_spec("codecarbon") is None:
        raise ImportError("energy figures need codecarbon: pip install slimline[energy]")
    batches = materialize(data, where="data")
    if not batches:
        raise ValueError("search: data is empty")
    cal = materialize(calibration, where="calibration") if calibration is not None else None
    train = materialize(training, where="training") if training is not None else None
    found = build_space(model, calibration=bool(cal), training=bool(train), spec=space)
    plan = _Plan(goals, limits, found, batches, cal, train, quality_batches)
    _check_metrics_apply(model, plan)
    return plan


def _check_metrics_apply(model: nn.Module, plan: _Plan) -> None:
    """Evaluate the original on one batch for the quality metrics asked: a metric that does not
    apply to this model (perplexity of a classifier) is an error now, not in every trial."""
    from slimline.evaluate import evaluate

    quality = [m.evaluator_metric for m in plan.measured if m.quality]
    if quality:
        evaluate(model, plan.data[:1], metrics=quality, baseline=model, runs=1, warmup=0)


def _enqueue_single_methods(study: Any, space: Space, *, limit: int) -> None:
    """Queue each method alone (``Space.single_methods``), at most ``limit``, once per study:
    a resumed study, or one that already ran trials, queues nothing more."""
    if study.get_trials(deepcopy=False):
        return
    for params in space.single_methods()[:limit]:
        study.enqueue_trial(params, skip_if_exists=True)


def _population(trials: int) -> int:
    """NSGA-II's generation size: a few generations within the budget, 4 to 50."""
    return max(4, min(50, trials // 4))


class _Trial:
    """The objective Optuna calls: one recipe, compressed and measured."""

    def __init__(self, model: nn.Module, plan: _Plan, *, runs: int, warmup: int,
                 threads: int | None) -> None:
        self.model, self.plan = model, plan
        self.runs, self.warmup, self.threads = runs, warmup, threads
        self._original: dict[str, float] = {}

    def __call__(self, trial: Any) -> tuple[float, ...]:
        optuna = import_optuna()
        trial.set_user_attr("worker", worker_id())
        recipe = self.plan.space.sample(trial)
        trial.set_user_attr("recipe", recipe.to_dict())
        try:
            compressed = self._compress(recipe)
            slice_report = self._quality_on_slice(compressed)
            if isinstance(slice_report, _Broken):
                return self._pruned(trial, slice_report)
            report = self._measure(compressed, slice_report)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {' '.join(str(exc).split())}")
            raise
        figures, baseline = report["models"]["model"], report["models"]["baseline"]
        trial.set_user_attr("report", report)
        violations = [c.violation(figures, baseline) for c in self.plan.constraints]
        trial.set_user_attr("violations", violations)
        return tuple(m.value(figures, baseline) for m in self.plan.objectives)

    def _compress(self, recipe: Any) -> nn.Module:
        from slimline.api import compress

        return compress(self.model, recipe, calibration=self.plan.calibration,
                        training=self.plan.training).model

    def _quality_on_slice(self, compressed: nn.Module) -> dict[str, Any] | _Broken | None:
        """Quality on the first batches: the report, or what broke when a quality constraint
        is already broken there."""
        quality = [m.evaluator_metric for m in self.plan.measured if m.quality]
        if not quality:
            return None
        from slimline.evaluate import evaluate

        report: dict[str, Any] = evaluate(
            compressed, self.plan.data[: self.plan.quality_batches], metrics=quality,
            baseline=self.model, runs=1, warmup=0, threads=self.threads)
        figures, baseline = report["models"]["model"], report["models"]["baseline"]
        broken = {c: c.violation(figures, baseline) for c in self.plan.quality_constraints}
        if not any(v > 0 for v in broken.values()):
            return report
        why = ", ".join(f"{c} (got {c.measured(figures, baseline):.4g})"
                        for c, v in broken.items() if v > 0)
        return _Broken(report, why, [broken.get(c, 0.0) for c in self.plan.constraints])

    def _pruned(self, trial: Any, broken: _Broken) -> tuple[float, ...]:
        """Record a trial pruned on the slice; its placeholder values for the sampler."""
        trial.set_user_attr("report", broken.report)
        trial.set_user_attr("pruned", f"breaks {broken.why} on {self.plan.quality_batches} "
                                      "batch(es), before timing")
        trial.set_user_attr("violations", broken.violations)
        figures, baseline = broken.report["models"]["model"], broken.report["models"]["baseline"]
        return tuple(m.value(figures, baseline) if m.quality else self._original_value(m)
                     for m in self.plan.objectives)

    def _original_value(self, metric: Metric) -> float:
        """The original model's value of a non-quality objective (a timing ratio is 1)."""
        if metric.timing:
            return 1.0
        if metric.name not in self._original:
            from slimline.evaluate import evaluate

            report = evaluate(self.model, self.plan.data[:1], metrics=[metric.evaluator_metric],
                              runs=1, warmup=0, threads=self.threads)
            figures = report["models"]["model"]
            self._original[metric.name] = metric.value(figures, figures)
        return self._original[metric.name]

    def _measure(self, compressed: nn.Module, slice_report: dict[str, Any] | None
                 ) -> dict[str, Any]:
        """The full report; quality is reused from the slice when the slice is all the data."""
        from slimline.evaluate import evaluate

        whole = slice_report is not None and len(self.plan.data) <= self.plan.quality_batches
        metrics = [m.evaluator_metric for m in self.plan.measured if not (whole and m.quality)]
        report: dict[str, Any] = evaluate(compressed, self.plan.data, metrics=metrics,
                                          baseline=self.model, runs=self.runs,
                                          warmup=self.warmup, threads=self.threads)
        if whole and slice_report is not None:
            for name in ("model", "baseline"):
                report["models"][name].update(slice_report["models"][name])
        return dict(report)


@dataclass(frozen=True)
class _Broken:
    """A trial's slice report that breaks a quality constraint: why, and the violations."""

    report: dict[str, Any]
    why: str
    violations: list[float]


@contextmanager
def _progress(show: bool, trials: int, plan: _Plan) -> Iterator[Callable[[Any, Any], None]]:
    """A rich progress bar over trials, its description the best feasible trial so far."""
    if not show:
        yield lambda _study, _trial: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    first = plan.objectives[0]
    with Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}")) as bar:
        task = bar.add_task("no feasible trial yet", total=trials)
        best: list[float] = []

        def update(_study: Any, frozen: Any) -> None:
            feasible = frozen.state.name == "COMPLETE" and all(
                v <= 0 for v in frozen.user_attrs.get("violations", []))
            if feasible:
                value = frozen.values[0]
                if not best or first.minimised(value) < first.minimised(best[0]):
                    best[:] = [value]
            text = f"best {first.name}: {best[0]:.4g}" if best else "no feasible trial yet"
            bar.update(task, advance=1, description=text)

        yield update
