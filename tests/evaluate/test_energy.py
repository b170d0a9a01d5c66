"""Energy: where the figure came from, and the report keys (short loops)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import threading

import pytest
import torch
from torch import nn

from slimline.evaluate import energy, evaluate

needs_codecarbon = pytest.mark.skipif(
    importlib.util.find_spec("codecarbon") is None, reason="codecarbon not installed"
)


class CPU:  # named like codecarbon's hardware classes, which energy_source inspects
    def __init__(self, mode: str) -> None:
        self._mode = mode


class GPU:
    pass


def test_energy_source_claims_counters_only_on_evidence() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert energy.energy_source([CPU("intel_rapl")], cpu) == "rapl"
    assert energy.energy_source([CPU("cpu_load")], cpu) == "estimate"
    assert energy.energy_source([CPU("constant")], cpu) == "estimate"
    assert energy.energy_source([], cpu) == "estimate"
    assert energy.energy_source([CPU("cpu_load"), GPU()], cuda) == "nvml"
    assert energy.energy_source([CPU("cpu_load"), GPU()], cpu) == "estimate"


@needs_codecarbon
def test_measure_energy_interleaves_and_runs_long_enough(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    log: list[str] = []
    threads_before = set(threading.enumerate())

    def step(name: str, size: int):
        def run() -> int:
            log.append(name)
            torch.randn(size, size) @ torch.randn(size, size)
            return 4
        return run

    cpu = torch.device("cpu")
    found = energy.measure_energy({"A": step("A", 100), "B": step("B", 300)},
                                  devices={"A": cpu, "B": cpu}, min_seconds=0.4, rounds=2,
                                  carbon_intensity_g_per_kwh=500.0)
    assert [name for name, _ in itertools.groupby(log)] == ["A", "B", "A", "B"]
    for name, measured in found.items():
        assert measured.seconds >= 0.4 and measured.items == 4 * log.count(name)
        assert measured.kwh > 0 and measured.source in ("rapl", "estimate")
        assert measured.co2_g == pytest.approx(measured.kwh * 500.0)
    assert list(tmp_path.iterdir()) == []
    assert set(threading.enumerate()) <= threads_before  # codecarbon's samplers stopped


@needs_codecarbon
def test_evaluate_reports_energy_keys(monkeypatch) -> None:
    monkeypatch.setattr(energy, "MIN_SECONDS", 0.2)
    report = evaluate(nn.Linear(16, 4), [torch.randn(8, 16)], metrics=["energy"],
                      carbon_intensity_g_per_kwh=400.0)
    figures = report["models"]["model"]
    assert set(figures) == {"energy_kwh", "energy_source", "co2_g"}
    assert figures["energy_source"] in ("rapl", "nvml", "estimate")
    assert figures["co2_g"] == pytest.approx(figures["energy_kwh"] * 400.0)
    assert report["conditions"]["energy_kwh"] == "kWh per 1000 items"
    assert report["conditions"]["methods"]["energy"]["carbon_intensity_g_per_kwh"] == 400.0
    json.dumps(report)


def test_missing_codecarbon_names_the_extra(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_codecarbon(name: str, *args, **kwargs):
        if name == "codecarbon":
            raise ImportError("no codecarbon")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_codecarbon)
    with pytest.raises(ImportError, match=r"pip install slimline\[energy\]"):
        energy.measure_energy({"model": lambda: 1}, devices={"model": torch.device("cpu")})
