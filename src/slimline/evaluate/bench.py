"""Timing and peak memory of forward passes.

Latency follows MEASURING.md: warm up, then time ``runs`` forwards of each model with
``time.perf_counter_ns``, interleaving the models (A B A B ...) so that a noisy neighbour
or a clock change hits both alike. GPU work is synchronised before each clock read.

Peak memory is the process's resident-set high-water mark while the measured work runs:
on Linux the mark is reset by writing ``5`` to ``/proc/self/clear_refs`` and read back as
``VmHWM`` from ``/proc/self/status``; where that is not allowed, ``getrusage`` gives the
lifetime peak instead, and the method says so. On CUDA devices it is
``torch.cuda.max_memory_allocated`` after a reset of the peak statistics.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_RESET_HWM = "5"  # clear_refs command: reset the peak RSS to the current RSS


@dataclass(frozen=True)
class Latency:
    """Timed samples of one model's forward, in milliseconds, and their summary."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p95_ms(self) -> float:
        return percentile(self.samples_ms, 95.0)

    def throughput(self, items_per_call: int) -> float:
        """Items per second at the median latency."""
        return items_per_call / (self.median_ms / 1e3)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between order statistics.

    Matches ``numpy.percentile``'s default: rank ``q/100 * (n-1)`` in the sorted values.
    """
    if not values:
        raise ValueError("percentile: no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    runs: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, Latency]:
    """Time each call ``runs`` times after ``warmup`` untimed rounds, alternating calls.

    Round r runs every call once, in the mapping's order (A B A B ...). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read so queued device work counts.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    wait = sync or _no_sync
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + runs):
        for name, call in calls.items():
            wait()
            start = time.perf_counter_ns()
            call()
            wait()
            elapsed_ns = time.perf_counter_ns() - start
            if round_index >= warmup:
                samples[name].append(elapsed_ns / 1e6)
    return {name: Latency(tuple(values)) for name, values in samples.items()}


def _no_sync() -> None:
    return None


@dataclass(frozen=True)
class PeakMemory:
    """A peak-memory reading: bytes, and how they were obtained (for ``conditions``)."""

    bytes: int
    method: str


def peak_memory_during(work: Callable[[], object], device: torch.device) -> PeakMemory:
    """The peak memory while ``work()`` runs: device memory on CUDA, process RSS otherwise."""
    if device.type == "cuda":
        return _peak_cuda_memory(work, device)
    return peak_rss_during(work)


def peak_rss_during(work: Callable[[], object]) -> PeakMemory:
    """The process's peak resident set size while ``work()`` runs, in bytes."""
    if _reset_rss_peak():
        work()
        return PeakMemory(_status_bytes("VmHWM"), "process RSS high-water mark (VmHWM), "
                          "reset through /proc/self/clear_refs before the loop")
    work()
    return PeakMemory(_rusage_peak_bytes(), "process RSS high-water mark from getrusage: "
                      "lifetime peak of the process, could not be reset before the loop")


def current_rss() -> int:
    """The process's resident set size now, in bytes (Linux ``VmRSS``)."""
    return _status_bytes("VmRSS")


def _reset_rss_peak() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        _CLEAR_REFS.write_text(_RESET_HWM)
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not found in {_STATUS}")


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes


def _peak_cuda_memory(work: Callable[[], object], device: torch.device) -> PeakMemory:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    return PeakMemory(int(torch.cuda.max_memory_allocated(device)),
                      f"torch.cuda.max_memory_allocated on {device} (peak stats reset before)")
