"""Many workers on one study, against a real PostgreSQL server (a throwaway cluster).

Two worker processes share a study: every trial is run by exactly one of them, each runs its
budget, and the study holds every trial. A worker killed (SIGKILL) mid-trial leaves a trial
that the next worker marks failed when its heartbeat is stale and runs again with the same
recipe: nothing is lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from slimline.search.result import SearchResult
from slimline.search.study import records
from tests.search import postgres

ROOT = Path(__file__).resolve().parents[2]
WHY_NOT = postgres.why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def cluster() -> Iterator[postgres.Cluster]:
    with postgres.throwaway_cluster() as running:
        yield running


def _worker(url: str, study: str, trials: int, worker: int, log: Path,
            hang_at: int | None = None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.search.pg_worker", url, study, "--trials", str(trials),
            "--worker", str(worker), "--log", str(log)]
    if hang_at is not None:
        argv += ["--hang-at", str(hang_at)]
    out = log.with_suffix(".out").open("wb")
    return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _finish(process: subprocess.Popen[bytes], log: Path) -> None:
    code = process.wait(timeout=120)
    assert code == 0, log.with_suffix(".out").read_text()[-3000:]


def _logged(log: Path) -> list[tuple[int, int]]:
    """(trial number, pid) lines the worker wrote as each of its trials started."""
    if not log.exists():
        return []
    return [(int(n), int(p)) for n, p in (line.split() for line in log.read_text().split("\n")
                                          if line)]


def _stored(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def test_two_workers_split_the_study_and_run_no_trial_twice(cluster: postgres.Cluster,
                                                            tmp_path: Path) -> None:
    url = cluster.create_database("two_workers")
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    workers = [_worker(url, "split", 2, i, logs[i]) for i in range(2)]
    for process, log in zip(workers, logs, strict=True):
        _finish(process, log)
    ran = [_logged(log) for log in logs]
    assert [len(r) for r in ran] == [2, 2]  # each worker ran its own budget
    numbers = Counter(n for r in ran for n, _ in r)
    assert all(count == 1 for count in numbers.values())  # no trial started twice
    stored = _stored(url, "split")
    assert sorted(numbers) == [t.number for t in stored] == list(range(4))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in stored)
    pids = {n: p for r in ran for n, p in r}
    for t in stored:  # the study's record of who ran each trial agrees with the workers' logs
        assert t.user_attrs["worker"].endswith(f":{pids[t.number]}")


def test_a_killed_workers_trial_is_failed_then_retried_and_nothing_is_lost(
    cluster: postgres.Cluster, tmp_path: Path
) -> None:
    url = cluster.create_database("killed_worker")
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    doomed = _worker(url, "killed", 3, 0, first, hang_at=2)
    hang = first.with_suffix(".hang")
    deadline = time.monotonic() + 120
    while not hang.exists():
        assert doomed.poll() is None, first.with_suffix(".out").read_text()[-3000:]
        assert time.monotonic() < deadline, "the worker never reached its second trial"
        time.sleep(0.1)
    killed_trial = int(hang.read_text())
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    stored = {t.number: t for t in _stored(url, "killed")}
    assert stored[killed_trial].state.name == "RUNNING"  # dead, and not yet known to be
    time.sleep(2.5)  # past the grace period (2 s) without a heartbeat
    survivor = _worker(url, "killed", 2, 1, second)
    _finish(survivor, second)

    trials = {t.number: t for t in _stored(url, "killed")}
    assert trials[killed_trial].state.name == "FAIL"
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state.name in ("COMPLETE", "PRUNED")
    assert retry.params == trials[killed_trial].params  # the same recipe, run to the end
    assert retry.user_attrs["recipe"] == trials[killed_trial].user_attrs["recipe"]
    # every trial accounted for: 1 done by the killed worker, 1 failed, 2 by the survivor
    ran = _logged(first) + _logged(second)
    assert sorted(n for n, _ in ran) == sorted(trials) == list(range(4))
    assert not [t for t in trials.values() if t.state.name in ("RUNNING", "WAITING")]
    assert retry.number in {n for n, _ in _logged(second)}
    # read back as a result: the failed trial says why and names its retry
    result = SearchResult(study="killed", objectives=(), constraints=(),
                          trials=records(optuna.load_study(study_name="killed", storage=url)))
    failed = next(t for t in result.trials if t.number == killed_trial)
    assert failed.state == "failed" and failed.note is not None
    assert f"retried as trial {retry.number}" in failed.note
    assert next(t for t in result.trials if t.number == retry.number).retry_of == killed_trial
