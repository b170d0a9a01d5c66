"""Per-layer pruning time: swiftprune vs sparsegpt vs wanda, 50 % unstructured, square layers.

SwiftPrune (arXiv 2501.16376) needs no Hessian: its scores come from Σx² per input feature and
its per-row threshold from a streaming EWMA instead of a sort. SparseGPT (arXiv 2301.00774)
inverts the (in × in) Hessian and updates the weights column by column; Wanda (arXiv
2306.11695) sorts every row. The pruning calls are timed interleaved in one process
(MEASURING.md), after one untimed warm-up round, on a random weight. Their input statistics
come from random tokens with a few outlier features. Accumulating those statistics is timed
apart: Σx² for swiftprune and wanda, X Xᵀ for sparsegpt. SparseGPT at the widest size runs
once (it takes minutes on 2 cores); the table says how many runs each figure is the median of.

The machine's 2 cores are shared. With libgomp's default busy-waiting, each parallel kernel
then waits out other processes' time slices: sparsegpt at 1024 wide took 1–13 s per call
instead of 0.4 s, and swiftprune 0.04–2 s. So, unless the caller sets ``OMP_WAIT_POLICY``,
the script re-runs itself with ``OMP_WAIT_POLICY=PASSIVE`` (libgomp reads it when torch
loads), and the table states the policy.

    .venv/bin/python -m benchmarks.swiftprune_timing [--widths 1024,4096,8192] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.harness import (
    conditions_line,
    interleaved,
    markdown_table,
    print_table,
    write_section,
)
from slimline.core.statistics import InputStats
from slimline.prune.sparsegpt import sparsegpt_prune_weight
from slimline.prune.swiftprune import swiftprune_prune_weight
from slimline.prune.wanda import wanda_mask

SPARSITY = 0.5


@dataclass
class Layer:
    """A square layer problem: weight (n, n) and the statistics of its inputs."""

    weight: torch.Tensor
    stats: InputStats  # Σx² and X Xᵀ
    sq_norm_ms: float  # time to accumulate Σx² alone
    xxt_ms: float  # time to accumulate Σx² and X Xᵀ


def make_layer(width: int, tokens: int, seed: int) -> Layer:
    """Random weight; inputs N(0, 1) with 1 % of features ×20 (LLM-like outliers)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=g) / width**0.5
    x = torch.randn(tokens, width, generator=g)
    x[:, torch.randperm(width, generator=g)[: max(1, width // 100)]] *= 20.0
    sq_norm_ms = _time_once(lambda: _accumulate(x, width, hessian=False))
    stats = InputStats(width, hessian=True)
    xxt_ms = _time_once(lambda: _feed(stats, x))
    return Layer(weight, stats, sq_norm_ms, xxt_ms)


def _accumulate(x: torch.Tensor, width: int, *, hessian: bool) -> InputStats:
    stats = InputStats(width, hessian=hessian)
    _feed(stats, x)
    return stats


def _feed(stats: InputStats, x: torch.Tensor) -> None:
    for chunk in x.split(512):  # as forward hooks would see calibration batches
        stats.add_batch(chunk)


def _time_once(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def pruners(layer: Layer) -> dict[str, Callable[[], torch.Tensor]]:
    """The three per-layer pruning calls, each returning the pruned weight."""
    w, stats = layer.weight, layer.stats
    hessian = stats.hessian  # formed once outside the timing, as prune_layerwise does

    def swift() -> torch.Tensor:
        return swiftprune_prune_weight(w, stats, sparsity=SPARSITY)

    def wanda() -> torch.Tensor:
        return w * wanda_mask(w, stats.input_norm, SPARSITY, None)

    def sparsegpt() -> torch.Tensor:
        return sparsegpt_prune_weight(w, hessian, sparsity=SPARSITY)

    return {"swiftprune": swift, "wanda": wanda, "sparsegpt": sparsegpt}


def measure(layer: Layer, runs: int, sparsegpt_runs: int) -> dict[str, list[float]]:
    """Samples in ms per method; sparsegpt is interleaved too unless it gets fewer runs."""
    calls = pruners(layer)
    if sparsegpt_runs >= runs:
        timed = interleaved(calls, runs=runs, warmup=1)
        return {name: list(lat.samples_ms) for name, lat in timed.items()}
    slow = calls.pop("sparsegpt")
    timed = interleaved(calls, runs=runs, warmup=1)
    samples = {name: list(lat.samples_ms) for name, lat in timed.items()}
    samples["sparsegpt"] = [_time_once(slow) for _ in range(sparsegpt_runs)]
    return samples


def achieved_sparsity(layer: Layer) -> float:
    pruned = swiftprune_prune_weight(layer.weight, layer.stats, sparsity=SPARSITY)
    return float((pruned == 0).float().mean())


def row(width: int, layer: Layer, samples: dict[str, list[float]]) -> list[str]:
    med = {name: statistics.median(values) for name, values in samples.items()}
    return [
        str(width),
        f"{layer.sq_norm_ms:.0f}",
        f"{layer.xxt_ms:.0f}",
        f"{med['swiftprune']:.0f}",
        f"{med['wanda']:.0f}",
        f"{med['sparsegpt']:.0f}",
        f"{med['sparsegpt'] / med['swiftprune']:.1f}×",
        f"{med['wanda'] / med['swiftprune']:.1f}×",
        f"{achieved_sparsity(layer):.4f}",
        f"{len(samples['swiftprune'])} / {len(samples['wanda'])} / {len(samples['sparsegpt'])}",
    ]


HEADER = [
    "width (n×n)", "Σx² stats ms", "Σx² + XXᵀ stats ms", "swiftprune ms", "wanda ms",
    "sparsegpt ms", "sparsegpt / swiftprune", "wanda / swiftprune",
    "swiftprune sparsity", "runs (swift / wanda / sgpt)",
]


def _reexec_with_passive_waiting() -> None:
    """Re-run this module with OMP_WAIT_POLICY=PASSIVE unless the caller chose a policy."""
    if "OMP_WAIT_POLICY" not in os.environ:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        target = ["-m", __spec__.name] if __spec__ is not None else [sys.argv[0]]
        os.execve(sys.executable, [sys.executable, *target, *sys.argv[1:]], env)


def main() -> None:
    _reexec_with_passive_waiting()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="1024,4096,8192")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsegpt-max-width", type=int, default=4096,
                        help="above this width sparsegpt runs once")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for i, width in enumerate(int(w) for w in args.widths.split(",")):
        layer = make_layer(width, args.tokens, seed=i)
        sgpt_runs = args.runs if width <= args.sparsegpt_max_width else 1
        rows.append(row(width, layer, measure(layer, args.runs, sgpt_runs)))
        print(f"width {width}: done", flush=True)
    load_after = os.getloadavg()[0]
    title = "swiftprune vs sparsegpt vs wanda: per-layer pruning time (50 % unstructured)"
    print_table(title, HEADER, rows)
    if not args.no_write:
        body = "\n\n".join([
            conditions_line(args.threads, runs=args.runs, calibration_tokens=args.tokens,
                            sparsity="50 % unstructured, square random layers",
                            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default")),
            "Pruning time excludes accumulating the input statistics, shown apart: swiftprune "
            "and wanda need only Σx² per input feature; sparsegpt needs X Xᵀ (its Hessian "
            "is formed from it outside the timing). Medians of interleaved runs after one "
            f"warm-up; sparsegpt runs once above {args.sparsegpt_max_width} wide. The 2 cores "
            f"were shared with other processes (1-min load average {load_before:.1f} at the "
            f"start, {load_after:.1f} at the end), which slows the many small kernels of every "
            "method: compare within a row, not with other tables.",
            markdown_table(HEADER, rows),
        ])
        write_section("swiftprune-timing", "SwiftPrune pruning time (arXiv 2501.16376)", body)


if __name__ == "__main__":
    main()
