"""Energy per 1,000 items of the original and each Pareto recipe, and a 1–5 star rating.

After a search, the original model and every recipe of the front (compressed again from its
stored recipe) are measured together by ``slimline.evaluate.energy.measure_energy``: one
codecarbon tracker, the models' inference loops interleaved (A B C A B C ...), so a change in
machine load hits them alike. The figure says where it came from (``rapl``/``nvml`` counters,
or codecarbon's ``estimate`` from TDP and load; MEASURING.md).

The stars are **relative to this search only**: the span from the lowest to the highest energy
among the original and the front, on this machine, is cut into five equal bands (rule in
:data:`RULE`, printed with every rating). They are not the AI Energy Score leaderboard's
stars, which place a model among every model submitted for a fixed task, measured on one
data-centre GPU; a 5-star recipe here is only the thriftiest of its own front.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimline.core.batches import Batch, batch_size, forward, materialize, to_device

if TYPE_CHECKING:
    from slimline.search.result import SearchResult

BANDS = 5
ORIGINAL = "original"
RULE = ("Stars are relative to this search, not the AI Energy Score leaderboard's (fixed tasks "
        "on one GPU, against every model submitted): the span from the lowest to the highest "
        "energy per 1,000 items among the original model and the Pareto recipes, measured "
        "together on this machine, is cut into 5 equal bands; the lowest band gets 5 stars, "
        "the highest 1 (all equal: 5 each).")


def star_ratings(energies: Sequence[float]) -> list[int]:
    """1–5 stars per energy figure (any one unit; lower is better), as :data:`RULE` says.

    With ``lo``/``hi`` the lowest/highest figure, ``e`` gets ``5 - min(4, floor(5 (e - lo) /
    (hi - lo)))`` stars: bands are closed below, the highest figure falls in the last band.
    """
    if not energies:
        raise ValueError("star_ratings: no energy figures to rate")
    for e in energies:
        if not isinstance(e, (int, float)) or isinstance(e, bool) or not math.isfinite(e) \
                or e < 0:
            raise ValueError(f"star_ratings: energies must be finite and >= 0, got {e!r}")
    lo, hi = min(energies), max(energies)
    if hi == lo:
        return [BANDS] * len(energies)
    # Rounded before the floor: a figure on a band's edge (lo + k·width) stays in band k
    # despite binary floating point (5 · 1.6 / 8 = 0.9999999999999999).
    bands = [math.floor(round(BANDS * (e - lo) / (hi - lo), 9)) for e in energies]
    return [BANDS - min(b, BANDS - 1) for b in bands]


@dataclass(frozen=True)
class EnergyRow:
    """One rated model: the original (``trial`` None) or a Pareto trial's recipe."""

    trial: int | None
    recipe: Mapping[str, Any] | None
    kwh_per_1000: float
    co2_g_per_1000: float
    stars: int

    @property
    def label(self) -> str:
        return ORIGINAL if self.trial is None else f"trial {self.trial}"

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "recipe": self.recipe, "kwh_per_1000_items": self.kwh_per_1000,
                "co2_g_per_1000_items": self.co2_g_per_1000, "stars": self.stars}


@dataclass(frozen=True)
class EnergyRating:
    """The original first, then the front's recipes; where the figures came from; the rule."""

    rows: tuple[EnergyRow, ...]
    source: str  # "rapl", "nvml" or "estimate" (evaluate/energy.py)
    hardware: tuple[str, ...]
    carbon_intensity_g_per_kwh: float | None
    items: int  # items per model in the measured loops
    seconds: float  # measured seconds per model (at least)
    rule: str = RULE

    @property
    def original(self) -> EnergyRow:
        return self.rows[0]

    def ratio(self, row: EnergyRow) -> float:
        """``row``'s energy per item over the original's."""
        base = self.original.kwh_per_1000
        return row.kwh_per_1000 / base if base > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "source": self.source,
                "hardware": list(self.hardware),
                "carbon_intensity_g_per_kwh": self.carbon_intensity_g_per_kwh,
                "items_per_model": self.items, "seconds_per_model": self.seconds,
                "rule": self.rule}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnergyRating:
        rows = tuple(EnergyRow(r["trial"], r["recipe"], r["kwh_per_1000_items"],
                               r["co2_g_per_1000_items"], r["stars"]) for r in data["rows"])
        return cls(rows, data["source"], tuple(data["hardware"]),
                   data["carbon_intensity_g_per_kwh"], data["items_per_model"],
                   data["seconds_per_model"], data["rule"])


def rate_energy(
    model: nn.Module,
    result: SearchResult,
    data: Iterable[object],
    *,
    calibration: Iterable[object] | None = None,
    training: Iterable[object] | None = None,
    threads: int | None = None,
    min_seconds: float | None = None,
    carbon_intensity_g_per_kwh: float | None = None,
    country_iso_code: str | None = None,
) -> EnergyRating:
    """Measure the original ``model`` and each recipe of ``result``'s front on ``data`` (each
    recipe compressed again with ``calibration``/``training``) in one interleaved codecarbon
    run, and rate them (:func:`star_ratings`). ``min_seconds``: measured seconds per model
    (default: ``evaluate.energy.MIN_SECONDS``). ValueError when the front is empty; ImportError
    naming the extra when codecarbon is missing."""
    from slimline.api import compress
    from slimline.evaluate import energy

    front = result.pareto
    if not front:
        raise ValueError(f"energy rating: study {result.study!r} has no Pareto recipe to rate "
                         "(no trial met the constraints)")
    batches = materialize(data, where="data")
    if not batches:
        raise ValueError("energy rating: data is empty")
    cal = materialize(calibration, where="calibration") if calibration is not None else None
    train = materialize(training, where="training") if training is not None else None
    models = {ORIGINAL: model}
    for trial in front:
        models[f"trial {trial.number}"] = compress(model, trial.to_recipe(), calibration=cal,
                                                   training=train).model
    devices = {name: _device_of(m) for name, m in models.items()}
    steps = {name: _one_pass(m, batches, devices[name]) for name, m in models.items()}
    with _measuring(models.values(), threads):
        found = energy.measure_energy(
            steps, devices=devices, min_seconds=min_seconds or energy.MIN_SECONDS,
            carbon_intensity_g_per_kwh=carbon_intensity_g_per_kwh,
            country_iso_code=country_iso_code or energy.DEFAULT_COUNTRY)
    per = energy.ITEMS_PER_FIGURE
    kwh = [found[name].kwh_per_item * per for name in models]
    stars = star_ratings(kwh)
    trials: list[Any] = [None, *front]
    rows = tuple(
        EnergyRow(None if t is None else t.number, None if t is None else t.recipe, k,
                  found[name].co2_g_per_item * per, s)
        for t, name, k, s in zip(trials, models, kwh, stars, strict=True))
    first = found[ORIGINAL]
    intensity = first.carbon_intensity_g_per_kwh
    return EnergyRating(rows, first.source, first.hardware,
                        intensity if math.isfinite(intensity) else None,
                        items=min(m.items for m in found.values()),
                        seconds=min(m.seconds for m in found.values()))


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _one_pass(model: nn.Module, batches: list[Batch], device: torch.device) -> Callable[[], int]:
    moved = [to_device(b, device) for b in batches]

    def run() -> int:
        for batch in moved:
            forward(model, batch)
        return sum(batch_size(b) for b in moved)

    return run


@contextmanager
def _measuring(models: Iterable[nn.Module], threads: int | None) -> Iterator[None]:
    """Eval mode, inference mode and the thread count while measuring; restored after."""
    models = list(models)
    training, previous = [m.training for m in models], torch.get_num_threads()
    for m in models:
        m.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(previous)
        for m, was in zip(models, training, strict=True):
            m.train(was)
