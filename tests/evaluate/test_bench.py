"""Timing and peak memory against outside measurements of the same work."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimline.evaluate import bench, evaluate


def test_percentile_matches_numpy() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0.0, 50.0, 95.0, 100.0):
        assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        bench.percentile([], 50.0)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101.0)


def test_time_interleaved_alternates_and_counts_runs() -> None:
    log: list[str] = []
    timings = bench.time_interleaved(
        {"A": lambda: log.append("A"), "B": lambda: log.append("B")}, runs=3, warmup=2
    )
    assert log == ["A", "B"] * 5
    assert all(len(t.samples_ms) == 3 for t in timings.values())


def test_latency_summary() -> None:
    latency = bench.Latency((4.0, 1.0, 3.0, 2.0))
    assert latency.median_ms == 2.5
    assert latency.p95_ms == pytest.approx(3.85)
    assert latency.throughput(10) == pytest.approx(10 / 0.0025)


class _Slow(nn.Module):
    """About 5–20 ms per forward on one core: a stack of 512×512 layers on 128 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(512, 512) for _ in range(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _outside_median_ms(model: nn.Module, x: torch.Tensor, runs: int) -> float:
    samples = []
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def test_latency_agrees_with_an_outside_perf_counter_loop() -> None:
    model, x = _Slow().eval(), torch.randn(128, 512)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outside = _outside_median_ms(model, x, runs=15)
    finally:
        torch.set_num_threads(previous)
    report = evaluate(model, [x], metrics=["latency", "throughput"], threads=1, runs=15)
    figures = report["models"]["model"]
    assert 0.5 <= figures["latency_ms_median"] / outside <= 2.0
    assert figures["latency_ms_p95"] >= figures["latency_ms_median"]
    assert figures["throughput_items_per_s"] == pytest.approx(
        128 / (figures["latency_ms_median"] / 1e3))
    assert report["conditions"]["threads"] == 1
    assert torch.get_num_threads() == previous


class _Hungry(nn.Module):
    """Touches a 200 MB temporary in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temporary = torch.ones(50_000_000)  # 50 M float32 = 200 MB, every page written
        return x * self.scale + temporary[:1]


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_sees_a_200mb_temporary() -> None:
    before = _vm_rss()
    report = evaluate(_Hungry(), [torch.randn(2, 3)], metrics=["memory"])
    # the 200 MB temporary, less a little RSS the process may give back meanwhile
    assert report["models"]["model"]["peak_memory_bytes"] >= before + 190_000_000
    assert "VmHWM" in report["conditions"]["methods"]["memory"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_is_reset_between_measurements() -> None:
    first = bench.peak_rss_during(lambda: torch.ones(50_000_000).sum())
    second = bench.peak_rss_during(lambda: None)
    assert first.bytes - second.bytes >= 150_000_000
