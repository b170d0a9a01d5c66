"""The conditions a measurement was taken under: machine, threads, library versions.

MEASURING.md asks every table to name the machine (CPU model, cores, threads set with
``torch.set_num_threads``), the torch version, and for GPU timings which GPU. This module
reads those facts; it measures nothing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

# CPU flags that decide which low-precision kernels torch can use, in the order reported.
RELEVANT_CPU_FLAGS: tuple[str, ...] = (
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx2",
    "fma",
)

_CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str, text: str) -> str | None:
    """The value of the first ``name : value`` line of a /proc/cpuinfo text."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def _read_cpuinfo() -> str:
    try:
        return _CPUINFO.read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    name = _cpuinfo_field("model name", _read_cpuinfo())
    return name or platform.processor() or platform.machine() or "unknown"


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """Which of :data:`RELEVANT_CPU_FLAGS` the CPU has (empty where flags are unreadable)."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = set((_cpuinfo_field("flags", text) or "").split())
    return [flag for flag in RELEVANT_CPU_FLAGS if flag in flags]


def machine_conditions(device: torch.device, threads: int) -> dict[str, Any]:
    """The machine part of a report's ``conditions``.

    ``threads`` is the count in force while measuring (``torch.get_num_threads()``);
    ``cores`` is what the operating system offers this process.
    """
    conditions: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": _usable_cores(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    if device.type == "cuda":
        conditions["gpu"] = torch.cuda.get_device_name(device)
        conditions["cuda"] = torch.version.cuda
    return conditions


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
