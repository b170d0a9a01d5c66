"""Energy and CO2 of an inference loop, measured with codecarbon.

codecarbon reads hardware energy counters where the machine exposes them (RAPL under
``/sys/class/powercap`` for CPUs, NVML for NVIDIA GPUs) and otherwise *estimates* power
from the CPU's TDP and load. The report says which (``energy_source``), judged from the
hardware objects the tracker actually set up: "rapl" or "nvml" only on positive evidence,
"estimate" in every other case. RAM power is always an estimate in codecarbon.

Only the inference loop is measured: hardware detection happens before, and each model's
loop runs inside codecarbon *tasks*, interleaved with the other model's (A B A B, as for
latency). The tracker follows this *process* (``tracking_mode="process"``), so other work on
a shared machine is not charged to the model. codecarbon samples power about every second,
so each model's loop repeats the data for at least ``min_seconds`` in all; the figures are
then divided per item. CO2 uses a stated carbon intensity, or codecarbon's offline figure
for a country.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

EnergySource = Literal["rapl", "nvml", "estimate"]

MIN_SECONDS = 2.0  # per model: a few of codecarbon's power samples; less reads mostly noise
ROUNDS = 4  # interleaved A B A B rounds the measuring time is split into
DEFAULT_COUNTRY = "USA"  # ISO 3166-1 alpha-3, for codecarbon's offline grid intensity
ITEMS_PER_FIGURE = 1000  # energy_kwh and co2_g are reported per this many items
TRACKING_MODE = "process"
_POWER_SAMPLE_SECONDS = 1.0


@dataclass(frozen=True)
class EnergyMeasurement:
    """Totals of one measured loop, and where they came from."""

    kwh: float
    co2_g: float
    items: int
    seconds: float
    source: EnergySource
    hardware: tuple[str, ...]
    carbon_intensity_g_per_kwh: float

    @property
    def kwh_per_item(self) -> float:
        return self.kwh / self.items

    @property
    def co2_g_per_item(self) -> float:
        return self.co2_g / self.items


def measure_energy(
    steps: Mapping[str, Callable[[], int]],
    *,
    devices: Mapping[str, torch.device],
    min_seconds: float = MIN_SECONDS,
    rounds: int = ROUNDS,
    carbon_intensity_g_per_kwh: float | None = None,
    country_iso_code: str = DEFAULT_COUNTRY,
) -> dict[str, EnergyMeasurement]:
    """Energy of each named ``step`` (one pass over the data; returns the items processed).

    The steps are interleaved (A B A B ...) over ``rounds`` rounds, each a codecarbon task
    that repeats its step for at least ``min_seconds / rounds``, so each model is measured
    for at least ``min_seconds`` in all and a change in machine load hits every model alike.
    ``carbon_intensity_g_per_kwh`` states the grid intensity; ``None`` takes codecarbon's
    offline figure for ``country_iso_code``. Raises ImportError naming the extra to install
    when codecarbon is missing.
    """
    if carbon_intensity_g_per_kwh is not None and carbon_intensity_g_per_kwh < 0:
        raise ValueError(
            f"carbon_intensity_g_per_kwh must be >= 0, got {carbon_intensity_g_per_kwh}"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    tracker = _make_tracker(country_iso_code)
    totals = {name: _Totals() for name in steps}
    with _quiet_codecarbon():
        tracker.get_detected_hardware()  # detection outside the measured windows
        hardware = list(getattr(tracker, "_hardware", []))
        for round_index in range(rounds):
            for name, step in steps.items():
                tracker.start_task(f"{name}-{round_index}")
                try:
                    items, seconds = _repeat(step, min_seconds / rounds, devices[name])
                finally:
                    task = tracker.stop_task()
                totals[name].add(task, items, seconds)
    return {
        name: total.result(
            carbon_intensity_g_per_kwh, energy_source(hardware, devices[name]),
            tuple(_describe(h) for h in hardware),
        )
        for name, total in totals.items()
    }


@dataclass
class _Totals:
    """Sums over one model's tasks."""

    kwh: float = 0.0
    co2_kg: float = 0.0
    items: int = 0
    seconds: float = 0.0

    def add(self, task: Any, items: int, seconds: float) -> None:
        self.kwh += float(task.energy_consumed)
        self.co2_kg += float(task.emissions)
        self.items += items
        self.seconds += seconds

    def result(
        self, intensity: float | None, source: EnergySource, hardware: tuple[str, ...]
    ) -> EnergyMeasurement:
        if intensity is None:  # codecarbon's country figure, reported back as stated
            co2_g = self.co2_kg * 1e3
            intensity = co2_g / self.kwh if self.kwh > 0 else math.nan
        else:
            co2_g = self.kwh * intensity
        return EnergyMeasurement(
            kwh=self.kwh, co2_g=co2_g, items=self.items, seconds=self.seconds, source=source,
            hardware=hardware, carbon_intensity_g_per_kwh=intensity,
        )


def _make_tracker(country_iso_code: str) -> Any:
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError as error:
        raise ImportError(
            "the 'energy' metric needs codecarbon: pip install slimline[energy]"
        ) from error
    with _quiet_codecarbon():
        return OfflineEmissionsTracker(
            country_iso_code=country_iso_code,
            save_to_file=False,
            log_level="critical",
            measure_power_secs=_POWER_SAMPLE_SECONDS,
            tracking_mode=TRACKING_MODE,
            allow_multiple_runs=True,  # no lock file, and other trackers may run
        )


def _repeat(step: Callable[[], int], min_seconds: float, device: torch.device) -> tuple[int, float]:
    """Call ``step`` at least once and until ``min_seconds`` have passed."""
    items = 0
    start = time.perf_counter()
    while True:
        items += step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return items, elapsed


def energy_source(hardware: Iterable[object], device: torch.device) -> EnergySource:
    """Where the energy figure mainly comes from: "nvml" if codecarbon tracked a GPU and the
    model runs on CUDA, "rapl" if it reads the CPU through RAPL, else "estimate".

    Other parts may still be estimated (RAM always is; the CPU beside an NVML-read GPU may
    be): the report's conditions list every hardware object the tracker used.
    """
    kinds = list(hardware)
    if device.type == "cuda" and any(type(h).__name__ == "GPU" for h in kinds):
        return "nvml"
    if any(type(h).__name__ == "CPU" and getattr(h, "_mode", None) == "intel_rapl" for h in kinds):
        return "rapl"
    return "estimate"


def _describe(hardware: object) -> str:
    describe = getattr(hardware, "description", None)
    return str(describe()) if callable(describe) else type(hardware).__name__


@contextmanager
def _quiet_codecarbon() -> Iterator[None]:
    """Silence codecarbon's logger and deprecation warnings, restoring the level after."""
    logger = logging.getLogger("codecarbon")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)
