"""GPTQ at scale: int4 of ``llama-1b-random`` (TinyLlama-1.1B's shapes, random weights) on
128 x 512 calibration tokens, block by block — its time and its peak memory.

The work runs in a child process (``--child``); the parent reads the child's peak resident
set size from the kernel after it exits (``getrusage(RUSAGE_CHILDREN)``, the high-water mark
of the largest finished child) — a measure from outside, which counts everything the
process touched: the float32 model, the calibration activations of one block, the Hessians
and the quantized layers. A first child only builds the model and the calibration tokens,
so the table also shows what GPTQ adds on top of holding the model.

The figure to meet (generation-speed issue): peak RSS at most 1.5x the float32 model's bytes.

    .venv/bin/python -m benchmarks.gptq_scale [--layers N] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import conditions_line, markdown_table, print_table, write_section

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    import slimline as sl
    from slimline.models.llama_random import SHAPES, build_llama_random, random_tokens

    torch.set_num_threads(args.threads)
    shape = SHAPES["full"]
    if args.layers is not None:
        shape = dataclasses.replace(shape, num_layers=args.layers)
    model = build_llama_random(shape)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = random_tokens(shape.vocab_size, sequences=args.sequences, length=args.length)
    batches = [
        {key: value[i : i + args.batch] for key, value in tokens.items()}
        for i in range(0, args.sequences, args.batch)
    ]
    seconds = 0.0
    if args.child == "gptq":
        recipe = {"steps": [{"method": "gptq", "bits": 4, "group_size": 128}]}
        start = time.perf_counter()
        sl.compress(model, recipe, calibration=batches, inplace=True)
        seconds = time.perf_counter() - start
    print(json.dumps({"fp32_bytes": fp32_bytes, "seconds": seconds,
                      "blocks": shape.num_layers}))  # fmt: skip


def run(args: argparse.Namespace, what: str) -> dict[str, Any]:
    """One child's JSON line and its peak RSS in bytes, read by this process."""
    command = [sys.executable, "-m", "benchmarks.gptq_scale", "--child", what,
               "--sequences", str(args.sequences), "--length", str(args.length),
               "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{what} child failed: {done.stderr.strip()[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise SystemExit(f"{what}: its peak does not exceed an earlier child's; run it first")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_rss"] = peak_kib * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="keep this many blocks")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="calibration sequences a batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=("build", "gptq"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    # The build-only child first: RUSAGE_CHILDREN keeps the largest child's peak, so the
    # (larger) gptq child's peak shows only if it comes second.
    build = run(args, "build")
    gptq = run(args, "gptq")
    mib = 2**20
    fp32 = gptq["fp32_bytes"]
    ratio = gptq["peak_rss"] / fp32
    header = ["child", "blocks", "calibration tokens", "seconds", "peak RSS MiB",
              "float32 model MiB", "peak ÷ model", "≤ 1.5×"]  # fmt: skip
    tokens = f"{args.sequences} × {args.length}"
    rows = [
        ["build model + tokens", build["blocks"], tokens, "-", round(build["peak_rss"] / mib),
         round(fp32 / mib), f"{build['peak_rss'] / fp32:.2f}", "-"],
        ["gptq int4 g128 (inplace)", gptq["blocks"], tokens, f"{gptq['seconds']:.0f}",
         round(gptq["peak_rss"] / mib), round(fp32 / mib), f"{ratio:.2f}",
         "met" if ratio <= 1.5 else "**missed**"],
    ]  # fmt: skip
    print_table("GPTQ int4 at scale: llama-1b-random", header, rows)
    if args.no_write:
        return
    body = (
        conditions_line(args.threads, calibration_batch=args.batch) + "\n\n"
        "Model: llama-1b-random — random weights: time and memory only, never quality. "
        "Each row is a child process; its peak RSS is read from outside "
        "(getrusage RUSAGE_CHILDREN after it exits). `sl.compress(model, gptq, "
        "calibration=..., inplace=True)`: block by block, one block's calibration "
        "activations alive at a time.\n\n" + markdown_table(header, rows)
    )
    write_section("gptq-scale", "GPTQ int4 at scale: llama-1b-random", body)


if __name__ == "__main__":
    main()
