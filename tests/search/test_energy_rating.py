"""The energy rating: the star rule against a hand computation, and the front measured."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import slimline.evaluate.energy as energy
from slimline.search import search
from slimline.search.energy_rating import RULE, EnergyRating, rate_energy, star_ratings

SPACE = {"methods": {"rtn": {"group_size": [32]}, "magnitude": {}}}


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 32, generator=g) for _ in range(2)]


def test_stars_against_a_hand_computation() -> None:
    # lowest 2, highest 10: five bands of width 1.6 — [2, 3.6) 5 stars, [3.6, 5.2) 4,
    # [5.2, 6.8) 3, [6.8, 8.4) 2, [8.4, 10] 1
    energies = [10.0, 2.0, 3.59, 3.6, 5.2, 6.0, 6.8, 8.39, 8.4, 9.99]
    assert star_ratings(energies) == [1, 5, 5, 4, 3, 3, 2, 2, 1, 1]
    # the units do not matter, only the span: the same figures in kWh rate the same
    assert star_ratings([e * 1e-6 for e in energies]) == star_ratings(energies)
    assert star_ratings([0.5, 0.5, 0.5]) == [5, 5, 5]  # nothing differs: none is worse
    assert star_ratings([4.0]) == [5]
    assert star_ratings([1.0, 3.0]) == [5, 1]


@pytest.mark.parametrize("bad", [[], [1.0, -0.1], [1.0, math.nan], [math.inf]])
def test_stars_refuse_bad_figures(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="star_ratings"):
        star_ratings(bad)


def _fake_measure(kwh_per_item: dict[int, float]) -> Any:
    """measure_energy answering each model's energy by its position among the steps."""

    def measure(steps: dict[str, Any], **_: Any) -> dict[str, energy.EnergyMeasurement]:
        out = {}
        for i, name in enumerate(steps):
            items = steps[name]()  # one real pass: the step runs the model
            out[name] = energy.EnergyMeasurement(
                kwh=kwh_per_item[i] * items, co2_g=400 * kwh_per_item[i] * items, items=items,
                seconds=1.0, source="estimate", hardware=("CPU (test)",),
                carbon_intensity_g_per_kwh=400.0)
        return out

    return measure


def test_the_front_is_rated_as_the_rule_says(tiny_mlp: torch.nn.Module, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    found = search(tiny_mlp, _data(), space=SPACE, objectives=["size", "cosine"], trials=4,
                   runs=1, warmup=0)
    front = found.pareto
    assert front
    # original 1e-6 kWh/item (1 Wh per 1,000); the front's recipes from 0.2 Wh upward
    fake = {0: 1e-6, **{i + 1: (0.2 + 0.15 * i) * 1e-6 for i in range(len(front))}}
    monkeypatch.setattr(energy, "measure_energy", _fake_measure(fake))
    rating = rate_energy(tiny_mlp, found, _data())
    assert [r.trial for r in rating.rows] == [None, *(t.number for t in front)]
    kwh = [fake[i] * 1000 for i in range(len(rating.rows))]
    assert [r.kwh_per_1000 for r in rating.rows] == pytest.approx(kwh)
    assert [r.stars for r in rating.rows] == star_ratings(kwh)
    assert rating.original.stars == 1 and rating.rows[1].stars == 5
    assert rating.ratio(rating.rows[1]) == pytest.approx(0.2)
    assert [r.recipe for r in rating.rows[1:]] == [t.recipe for t in front]
    # written with the result: the table, the rule, the source, and JSON that reads back
    found.energy = rating
    found.write(tmp_path)
    text = (tmp_path / "pareto.md").read_text()
    assert "## Energy rating" in text and RULE in text and "source: estimate" in text
    assert "not the AI Energy Score" in RULE
    stored = json.loads((tmp_path / "search.json").read_text())["energy_rating"]
    assert EnergyRating.from_dict(stored) == rating


@pytest.mark.skipif(importlib.util.find_spec("codecarbon") is None, reason="needs codecarbon")
def test_search_measures_the_front_with_codecarbon(tiny_mlp: torch.nn.Module,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "MIN_SECONDS", 0.4)  # a short loop: the wiring, not the figure
    found = search(tiny_mlp, _data(), space=SPACE, objectives=["size"], trials=2, runs=1,
                   warmup=0, energy_rating=True)
    rating = found.energy
    assert rating is not None
    assert len(rating.rows) == 1 + len(found.pareto)
    assert rating.source in ("rapl", "nvml", "estimate")
    assert all(r.kwh_per_1000 >= 0 and 1 <= r.stars <= 5 for r in rating.rows)
    assert [r.stars for r in rating.rows] == star_ratings([r.kwh_per_1000 for r in rating.rows])
    assert rating.seconds >= 0.4 and rating.items > 0


def test_no_front_no_rating(tiny_mlp: torch.nn.Module) -> None:
    found = search(tiny_mlp, _data(), space=SPACE, objectives=["size"], trials=1,
                   constraints=["size<=10"], runs=1, warmup=0, energy_rating=True)
    assert not found.feasible and found.energy is None
    with pytest.raises(ValueError, match="no Pareto recipe to rate"):
        rate_energy(tiny_mlp, found, _data())
