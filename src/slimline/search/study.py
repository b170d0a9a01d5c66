"""The Optuna side: storage, sampler, the study, and trials read back as records.

Storage: ``None`` keeps the study in memory; a database URL (``sqlite:///search.db`` for one
machine, ``postgresql://...`` for many workers) makes it shared and resumable — the same URL
and study name continue where an earlier run stopped. A URL that does not parse or cannot be
opened is one ValueError before any trial. Database studies get a heartbeat, so a worker
killed mid-trial leaves a trial that the next worker to start a trial marks failed (no
heartbeat for ``GRACE_S`` seconds) and queues again once, with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``, called ``RetryFailedTrialCallback`` before 4.9).

Workers sharing a study each pass their own ``worker`` number: it goes into the sampler's seed,
so workers started together on a fresh study do not sample the same first recipes.

The sampler is NSGA-II (Deb et al. 2002, doi:10.1109/4235.996017) with Optuna's constraint
handling (a feasible trial beats an infeasible one; infeasible ones rank by total violation).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from slimline.search.objectives import Constraint, Metric
from slimline.search.result import TrialRecord

if TYPE_CHECKING:
    import optuna

HEARTBEAT_S = 60  # a trial is declared dead after GRACE_S without a heartbeat
GRACE_S = 180
MAX_RETRY = 1  # a trial whose worker died is run once more; a second death leaves it failed
OPEN_ATTEMPTS = 3
DEFAULT_STUDY = "slimline-search"
SamplerName = Literal["nsga2", "random"]


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError("recipe search needs optuna: pip install slimline[search]") from None
    return optuna


def describe_url(url: str | None) -> str | None:
    """The storage URL with any password hidden (safe to print and store)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def open_storage(url: str | None) -> Any:
    """An Optuna storage for ``url``; ValueError naming the URL when it is malformed or the
    database cannot be reached."""
    optuna = import_optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"storage {url!r} is not a database URL; use e.g. "
                         "sqlite:///search.db or postgresql://user@host/db")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"storage {url!r} is not a valid database URL: {exc}") from None
    last: Exception | None = None
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return _rdb_storage(optuna, url)
        except Exception as exc:
            last = exc
            if not _is_table_race(exc):
                break
            time.sleep(0.2 * (attempt + 1))
    message = " ".join(str(last).split())[:300]
    raise ValueError(f"storage {describe_url(url)}: cannot open the database: "
                     f"{type(last).__name__}: {message}") from None


def _rdb_storage(optuna: Any, url: str) -> Any:
    """An RDBStorage with a heartbeat whose stale trials are queued again once."""
    with warnings.catch_warnings():  # the retry callback is "experimental" in Optuna 4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
            retry = {"heartbeat_stale_trial_callback":
                     optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)}
        else:
            retry = {"failed_trial_callback":
                     optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, **retry)


def _is_table_race(exc: Exception) -> bool:
    """Workers opening a fresh database together race to create Optuna's tables: the loser
    gets a duplicate-object error, and a second try finds the tables made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    return isinstance(exc, (IntegrityError, ProgrammingError)) and any(
        word in str(exc).lower() for word in ("already exists", "duplicate key"))


def sampler_seed(seed: int, existing_trials: int, worker: int = 0) -> int:
    """A seed per (seed, trials already in the study, worker): a resumed study does not replay
    the random first samples it already tried, two workers do not sample the same recipes, and
    a fresh study with the same seed and worker repeats exactly."""
    return (seed * 1_000_003 + existing_trials + worker * 7_919) % (2**32)


def create_study(
    storage: Any,
    name: str,
    objectives: Sequence[Metric],
    constraints: Sequence[Constraint],
    *,
    seed: int,
    population: int,
    worker: int = 0,
    sampler: SamplerName = "nsga2",
) -> optuna.Study:
    """Create or load study ``name``; a loaded study must have the same objectives and
    constraints (ValueError otherwise, before any trial). ``worker``: this worker's number
    among those sharing the study (part of the sampler's seed). ``sampler``: "nsga2", or
    "random" (uniform over the space, the baseline a search should beat)."""
    optuna = import_optuna()
    directions = ["maximize" if m.higher_is_better else "minimize" for m in objectives]
    existing = _existing_trials(optuna, storage, name)
    seeded = sampler_seed(seed, existing, worker)
    if sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=seeded)
    elif sampler == "nsga2":
        with warnings.catch_warnings():  # constraints_func is "experimental" in Optuna 4
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            chosen = optuna.samplers.NSGAIISampler(
                population_size=population, seed=seeded,
                constraints_func=_violations if constraints else None,
            )
    else:
        raise ValueError(f"search: sampler must be 'nsga2' or 'random', got {sampler!r}")
    with quiet(optuna):
        study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    sampler=chosen, load_if_exists=True)
    _check_same_search(study, objectives, constraints)
    return study


def _existing_trials(optuna: Any, storage: Any, name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def _check_same_search(study: optuna.Study, objectives: Sequence[Metric],
                       constraints: Sequence[Constraint]) -> None:
    wanted = {"objectives": [m.name for m in objectives],
              "constraints": [str(c) for c in constraints]}
    for key, value in wanted.items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            raise ValueError(f"study {study.study_name!r} was created with {key} {stored}, "
                             f"not {value}: use another study name to search anew")


def _violations(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    violations: list[float] = trial.user_attrs["violations"]
    return violations


@contextmanager
def quiet(optuna: Any) -> Iterator[None]:
    """Optuna's per-trial INFO lines off while we run (warnings and errors stay)."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of ``study`` as a :class:`TrialRecord`, in trial order."""
    out = []
    for t in study.get_trials(deepcopy=False):
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(
            t.state.name, "running")
        if state == "complete" and "pruned" in t.user_attrs:
            state = "pruned"  # told complete so that the sampler learns from it (runner.py)
        note = t.user_attrs.get("error") or t.user_attrs.get("pruned")
        if state == "failed" and note is None:
            note = t.system_attrs.get("fail_reason") or (
                "no result: its worker stopped mid-trial (killed or interrupted), and the "
                "trial was marked failed once its heartbeat went stale")
        out.append(TrialRecord(
            number=t.number, state=state, recipe=t.user_attrs.get("recipe"),
            values=tuple(t.values) if t.values is not None and state == "complete" else None,
            violations=tuple(t.user_attrs.get("violations", ())),
            report=t.user_attrs.get("report"), note=note,
            worker=t.user_attrs.get("worker"), retry_of=t.system_attrs.get("failed_trial"),
        ))
    return _link_retries(out)


def _link_retries(trials: list[TrialRecord]) -> list[TrialRecord]:
    """A failed trial that was queued again names the trial that retried it."""
    retried = {t.retry_of: t.number for t in trials if t.retry_of is not None}
    return [replace(t, note=f"{t.note}; retried as trial {retried[t.number]}")
            if t.state == "failed" and t.number in retried else t for t in trials]
