"""Tiny searches end to end: the front, resume, failures, infeasible studies, bad storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import slimline.api
import slimline.core.registry
from slimline.core.recipe import Recipe
from slimline.search import SearchResult, TrialRecord, load_search, search
from slimline.search.result import dominates

SPACE = {"methods": {"rtn": {"group_size": [32]}, "magnitude": {}}}


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 32, generator=g) for _ in range(2)]


def _search(model: torch.nn.Module, **options: Any) -> SearchResult:
    options.setdefault("objectives", ["latency", "size"])
    return search(model, _data(), space=SPACE, runs=2, warmup=0, **options)


def _minimised(result: SearchResult, trial: TrialRecord) -> list[float]:
    assert trial.values is not None
    pairs = zip(result.objectives, trial.values, strict=True)
    return [-v if m.higher_is_better else v for m, v in pairs]


def test_the_front_is_the_non_dominated_feasible_trials(tiny_mlp: torch.nn.Module,
                                                        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    found = _search(tiny_mlp, objectives=["size", "cosine"], constraints=["cosine>=0.9"],
                    trials=6, storage=url, study="front")
    assert len(found.trials) == 6
    feasible = [t for t in found.trials if t.state == "complete"
                and all(v <= 0 for v in t.violations)]
    assert feasible
    front = {t.number for t in found.pareto}
    for t in feasible:  # brute force over every pair
        beaten = any(dominates(_minimised(found, o), _minimised(found, t)) for o in feasible)
        assert (t.number in front) == (not beaten)
    # the same front as Optuna's own, read back from the database
    stored = optuna.load_study(study_name="front", storage=url)
    assert front == {t.number for t in stored.best_trials}
    # cheap first: pruned trials broke the cosine bound on the slice and were never timed
    for t in found.trials:
        figures, _ = t.figures()
        assert ("size_bytes_disk" in figures) == (t.state == "complete")
    # best(): the smallest feasible recipe; with an extra constraint, the smallest meeting it
    smallest = min(feasible, key=lambda t: _minimised(found, t))
    assert found.best().to_dict() == smallest.to_recipe().to_dict()
    with pytest.raises(ValueError, match="no trial"):
        found.best("size<=1")
    written = found.write(tmp_path / "out")
    recipes = sorted((tmp_path / "out").glob("pareto-trial*.yaml"))
    assert len(recipes) == len(front)
    assert {json.dumps(Recipe.from_file(p).to_dict(), sort_keys=True) for p in recipes} == {
        json.dumps(t.to_recipe().to_dict(), sort_keys=True) for t in found.pareto}
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert report["pareto"] == [t.number for t in found.pareto]
    assert "## Pareto front" in (tmp_path / "out" / "pareto.md").read_text()
    assert tmp_path / "out" / "search.json" in written


def test_resume_continues_the_same_study(tiny_mlp: torch.nn.Module, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    first = _search(tiny_mlp, trials=2, storage=url, study="r")
    second = _search(tiny_mlp, trials=2, storage=url, study="r")
    assert [t.number for t in second.trials] == [0, 1, 2, 3]
    assert [t.recipe for t in second.trials[:2]] == [t.recipe for t in first.trials]
    loaded = load_search(url, "r")  # read back without searching: the same trials and front
    assert loaded.to_dict()["trials"] == second.to_dict()["trials"]
    assert [m.name for m in loaded.objectives] == ["latency", "size"]
    with pytest.raises(ValueError, match="has no study 'nope'"):
        load_search(url, "nope")
    with pytest.raises(ValueError, match="created with objectives"):
        _search(tiny_mlp, objectives=["size"], trials=1, storage=url, study="r")


def test_the_first_trials_are_each_method_alone_once_per_study(tiny_mlp: torch.nn.Module,
                                                               tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'warm.db'}"
    found = _search(tiny_mlp, trials=4, storage=url, study="w")
    methods = [[s["method"] for s in (t.recipe or {})["steps"]] for t in found.trials]
    assert methods[:2] == [["magnitude"], ["rtn"]]  # prune before quantize: slot order
    defaults = slimline.core.registry.config_type("magnitude")()
    assert found.trials[0].recipe["steps"][0]["sparsity"] == defaults.sparsity
    again = _search(tiny_mlp, trials=2, storage=url, study="w")  # resumed: nothing queued
    stored = optuna.load_study(study_name="w", storage=url)
    assert len(again.trials) == 6 and not [
        t for t in stored.trials if t.state == optuna.trial.TrialState.WAITING]
    other = _search(tiny_mlp, trials=2, storage=f"sqlite:///{tmp_path / 'w1.db'}", study="w",
                    worker=1)  # a second worker leaves the queue to worker 0
    cold = _search(tiny_mlp, trials=2, storage=f"sqlite:///{tmp_path / 'w0.db'}", study="w",
                   warm_start=False)
    assert [t.recipe for t in other.trials] != [t.recipe for t in found.trials[:2]]
    assert [t.recipe for t in cold.trials] != [t.recipe for t in found.trials[:2]]


def test_a_crashing_trial_is_recorded_failed_and_the_study_goes_on(
    tiny_mlp: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = slimline.api.compress, []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in trial two")
        return real(*args, **kwargs)

    monkeypatch.setattr(slimline.api, "compress", flaky)
    found = _search(tiny_mlp, trials=4)
    assert [t.state for t in found.trials].count("failed") == 1
    failed = next(t for t in found.trials if t.state == "failed")
    assert failed.number == 1 and failed.note == "RuntimeError: boom in trial two"
    assert all(t.state == "complete" for t in found.trials if t.number != 1)
    assert found.pareto


def test_no_feasible_trial_says_so_and_shows_the_closest(tiny_mlp: torch.nn.Module,
                                                         tmp_path: Path) -> None:
    found = _search(tiny_mlp, constraints=["cosine>=1.5", "size<=10"], trials=3)
    assert not found.feasible and found.pareto == []
    assert all(t.state in ("pruned", "complete") for t in found.trials)
    closest = found.closest
    least = min(sum(max(v, 0) for v in t.violations) for t in found.trials)
    assert closest[0].total_violation == pytest.approx(least)
    assert [t.total_violation for t in closest] == sorted(t.total_violation for t in closest)
    with pytest.raises(ValueError, match="no trial of study"):
        found.best()
    found.write(tmp_path)
    assert list(tmp_path.glob("closest-trial*.yaml"))
    assert "No trial meets the constraints" in (tmp_path / "pareto.md").read_text()


def test_trials_pruned_on_the_slice_feed_nsga2s_generations(tiny_mlp: torch.nn.Module,
                                                            tmp_path: Path) -> None:
    # Optuna's genetic samplers build populations from COMPLETE trials only: were a pruned
    # trial stored PRUNED, a search pruning everything would stay in random generation 0.
    url = f"sqlite:///{tmp_path / 's.db'}"
    found = _search(tiny_mlp, objectives=["latency", "size", "cosine"],
                    constraints=["cosine>=1.5"], trials=8, population=2, storage=url,
                    study="all-pruned")
    assert [t.state for t in found.trials] == ["pruned"] * 8
    assert all(t.values is None and t.note and "before timing" in t.note
               for t in found.trials)
    stored = optuna.load_study(study_name="all-pruned", storage=url)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in stored.trials)
    slice_cosines = [t.figures()[0]["cosine"] for t in found.trials]
    # the placeholders: the original's latency ratio (1) and size, the slice's cosine
    size = stored.trials[0].values[1]
    assert all(t.values[:2] == [1.0, size] for t in stored.trials)
    assert [t.values[2] for t in stored.trials] == pytest.approx(slice_cosines)
    assert size == pytest.approx(sum(p.numel() * p.element_size()
                                     for p in tiny_mlp.parameters()), rel=0.05)
    sampler = optuna.samplers.NSGAIISampler(population_size=2)
    assert sampler.get_trial_generation(stored, stored.trials[-1]) >= 2
    assert not found.pareto and found.closest


@pytest.mark.parametrize(("url", "message"), [
    ("s.db", "not a database URL"),
    ("sqlite+nodriver:///x.db", "cannot open"),
    ("sqlite:////nonexistent-dir/below/s.db", "cannot open the database"),
])
def test_bad_storage_is_one_error_before_any_trial(
    tiny_mlp: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    def never(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a trial ran")

    monkeypatch.setattr(slimline.api, "compress", never)
    with pytest.raises(ValueError, match=message):
        _search(tiny_mlp, trials=2, storage=url)


def test_bad_arguments_fail_before_any_trial(tiny_mlp: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        _search(tiny_mlp, objectives=["speed"], trials=1)
    with pytest.raises(ValueError, match="does not parse"):
        _search(tiny_mlp, constraints=["cosine=>0.9"], trials=1)
    with pytest.raises(ValueError, match="perplexity"):  # not a language model
        _search(tiny_mlp, constraints=["perplexity<=+2%"], trials=1)


def test_workers_sample_differently_and_each_repeats_itself(tiny_mlp: torch.nn.Module) -> None:
    def recipes(worker: int) -> list[Any]:
        found = _search(tiny_mlp, objectives=["size"], trials=3, worker=worker)
        return [t.recipe for t in found.trials]

    assert recipes(0) == recipes(0)  # a fresh study with the same seed and worker repeats
    assert recipes(0) != recipes(1)  # workers sharing a study do not sample the same recipes
    with pytest.raises(ValueError, match="worker must be an integer >= 0"):
        _search(tiny_mlp, trials=1, worker=-1)
