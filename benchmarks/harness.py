"""Shared pieces of the benchmark scripts: conditions, interleaved timing, BENCHMARKS.md.

Each script measures its rows in one process, interleaved (MEASURING.md), prints a table and
rewrites its own section of BENCHMARKS.md between ``<!-- NAME -->`` markers, naming the
command that produced it.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from slimline.evaluate.bench import Latency, time_interleaved
from slimline.evaluate.conditions import machine_conditions

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = "# slimline benchmarks\n\nEvery table names the command that produced it. Figures are medians of interleaved runs in one process (see `../shared/design/MEASURING.md` in the design notes); ratios are against fp32 / the original model in the same run.\n"


def conditions_line(threads: int, device: str = "cpu", **extra: Any) -> str:
    """One Markdown line stating the machine (and the GPU, for ``device="cuda"``), torch,
    threads and the run's settings."""
    cond = machine_conditions(torch.device(device), threads)
    features = ", ".join(cond["cpu_features"]) or "none reported"
    parts = [f"CPU: {cond['cpu']} ({cond['cores']} cores; features: {features})",
             f"threads: {threads}", f"torch {cond['torch']}"]
    if "gpu" in cond:
        parts.insert(1, f"GPU: {cond['gpu']} (CUDA {cond['cuda']})")
    parts += [f"{k.replace('_', ' ')}: {v}" for k, v in extra.items()]
    return "; ".join(parts)


def isa_suffix() -> str:
    """A section-name suffix for the CPU's widest matrix units ("-amx", "-avx512", or "" for
    AVX2 and below), so that a run on another kind of CPU adds a section, not overwrites one."""
    from slimline.evaluate.conditions import cpu_features

    features = set(cpu_features())
    if "amx_tile" in features or "amx_int8" in features:
        return "-amx"
    return "-avx512" if "avx512f" in features else ""


def interleaved(calls: Mapping[str, Callable[[], object]], *, runs: int, warmup: int,
                sync: Callable[[], None] | None = None) -> dict[str, Latency]:
    """Median-ready samples of every call, alternating A B C A B C ... (bench.time_interleaved;
    ``sync``, e.g. ``torch.cuda.synchronize``, before each clock read)."""
    return time_interleaved(calls, runs=runs, warmup=warmup, sync=sync)


def command_line() -> str:
    """The command as it was typed (``python -m benchmarks.x`` or ``python benchmarks/x.py``),
    quoted for a shell."""
    return shlex.join([".venv/bin/python", *sys.orig_argv[1:]])


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, atomically."""
    block = f"<!-- {name} -->\n## {title}\n\nCommand: `{command_line()}`\n\n{body.strip()}\n<!-- /{name} -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS_MD)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)
