"""Hypervolume of a front: against counting unit cells, and against Optuna's own."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from slimline.search import search
from slimline.search.objectives import metric
from slimline.search.result import hypervolume

SPACE = {"methods": {"rtn": {"group_size": [32]}, "magnitude": {}}}


def _cells(points: list[tuple[int, ...]], reference: tuple[int, ...]) -> int:
    """Brute force: the unit cells of the box below ``reference`` that some point dominates."""
    ranges = [range(r) for r in reference]
    return sum(any(all(p[k] <= c[k] for k in range(len(c))) for p in points)
               for c in itertools.product(*ranges))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_hypervolume_counts_the_dominated_cells(d: int) -> None:
    rng = random.Random(d)
    reference = (7,) * d
    for _ in range(20):
        points = [tuple(rng.randrange(0, 9) for _ in range(d)) for _ in range(rng.randrange(1, 7))]
        assert hypervolume(points, reference) == _cells(points, reference)


def test_hypervolume_matches_optunas() -> None:
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(0)
    for d in (2, 3):
        points = rng.uniform(0, 1, size=(12, d))
        reference = np.full(d, 1.1)
        assert hypervolume(points.tolist(), reference.tolist()) == pytest.approx(
            compute_hypervolume(points, reference))


def test_points_outside_the_reference_add_nothing() -> None:
    assert hypervolume([(2.0, 0.5)], (1.0, 1.0)) == 0.0
    assert hypervolume([(1.0, 0.5)], (1.0, 1.0)) == 0.0  # on the bound: no volume
    assert hypervolume([], (1.0, 1.0)) == 0.0


def test_relative_figures_put_the_original_at_one() -> None:
    base = {"latency_ms_median": 10.0, "size_bytes_disk": 400, "throughput_items_per_s": 50.0,
            "accuracy": 0.8}
    model = {"latency_ms_median": 5.0, "size_bytes_disk": 100, "throughput_items_per_s": 200.0,
             "accuracy": 0.4, "cosine": 0.8}
    assert metric("latency").relative(model, base) == pytest.approx(0.5)
    assert metric("size").relative(model, base) == pytest.approx(0.25)
    assert metric("throughput").relative(model, base) == pytest.approx(0.25)  # 4× the items/s
    assert metric("accuracy").relative(model, base) == pytest.approx(2.0)  # half the accuracy
    assert metric("cosine").relative(model, base) == pytest.approx(1.25)
    assert metric("latency").relative(base, base) == metric("size").relative(base, base) == 1.0
    with pytest.raises(ValueError, match="kl has no ratio"):
        metric("kl").relative(model, base)


def test_a_search_reports_its_fronts_hypervolume(tiny_mlp: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 32, generator=g) for _ in range(2)]
    found = search(tiny_mlp, data, space=SPACE, objectives=["size", "cosine"], trials=4,
                   runs=1, warmup=0, sampler="random")
    front = found.relative_front()
    assert len(front) == len(found.pareto) >= 1
    for t, (size, inv_cos) in zip(found.pareto, front, strict=True):
        figures, baseline = t.figures()
        assert size == pytest.approx(figures["size_bytes_disk"] / baseline["size_bytes_disk"])
        assert inv_cos == pytest.approx(1 / figures["cosine"])
    assert found.hypervolume(1.5) == pytest.approx(hypervolume(front, [1.5, 1.5]))
    with pytest.raises(ValueError, match="reference values"):
        found.hypervolume([1.0])
    with pytest.raises(ValueError, match="sampler must be"):
        search(tiny_mlp, data, space=SPACE, trials=1, sampler="grid")  # type: ignore[arg-type]
