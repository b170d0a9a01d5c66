"""Training throughput of the one training loop: fp32 against bf16 autocast, with and without
gradient checkpointing.

Each configuration runs the ``distill`` step (``trainable: all``, teacher = the model before the
recipe) through ``sl.compress`` for ``--steps`` optimizer steps on the train split. The four
configurations run in rounds, A B C D A B C D ... (MEASURING.md), and each figure is the median
over the rounds:

* **tokens/s**: tokens trained (non-padding tokens of the batches the steps consumed) over the
  distill step's wall time, which includes the teacher's forward on each batch (it is computed
  once per batch, as in every distill run) and the optimizer;
* **peak memory**: measured once per configuration in a fresh Python process (two runs in one
  process share its allocator's retained pages): the resident-set high-water mark during the
  step, reset before it (``/proc/self/clear_refs``), minus the resident set just before, with
  the model and data loaded: the step's own working memory (activations, gradients, optimizer
  state, teacher outputs, the student copy).

``--device cuda`` trains on the GPU (the model moved there; batches follow it); peak memory is
then ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before.

Without BF16 instructions (``avx512_bf16``/AMX) the CPU emulates bfloat16 matmuls, so autocast
is expected to be slower there; the conditions line names the CPU's features.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import slimline as sl
from benchmarks.harness import conditions_line, markdown_table, print_table, write_section
from slimline.evaluate.bench import current_rss, peak_memory_during
from slimline.models import load_builtin
from slimline.train.data import count_tokens

SECTION = "train-throughput"
TITLE = "Training throughput: fp32 and bf16 autocast, with and without gradient checkpointing"
CONFIGS = {
    "fp32": {"autocast": False, "checkpointing": False},
    "fp32 + checkpointing": {"autocast": False, "checkpointing": True},
    "bf16 autocast": {"autocast": True, "checkpointing": False},
    "bf16 autocast + checkpointing": {"autocast": True, "checkpointing": True},
}


def measure(model: torch.nn.Module, train: list[Any], step: dict[str, Any]) -> tuple[float, int]:
    """(tokens/s, the step's own peak memory in bytes) of one distill run."""
    seconds: list[float] = []
    device = next(model.parameters()).device

    def work() -> None:
        result = sl.compress(model, {"steps": [step]}, training=train)
        seconds.append(sum(r.seconds for r in result.steps if r.method == "distill"))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss()
    peak = peak_memory_during(work, device)
    tokens = sum(count_tokens(b) for b in train[: step["steps"]])
    return tokens / seconds[0], peak.bytes - before


def child_memory(args: argparse.Namespace, name: str) -> int:
    """The step's own peak memory for configuration ``name``, in a fresh process."""
    argv = [sys.executable, "-m", "benchmarks.train_throughput", "--child", name, "--model", args.model,
            "--size", args.size, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["code-llama-tiny", "minilm"], default="code-llama-tiny")
    parser.add_argument("--size", choices=["full", "small"], default="full", help="code-llama-tiny size")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]

    if args.model == "code-llama-tiny":
        built = load_builtin("code-llama-tiny", size=args.size)
    else:
        built = load_builtin("minilm")
    built.model.to(args.device)
    train = built.batches("train", batch_size=args.batch_size, limit=args.steps)
    if len(train) < args.steps:
        raise SystemExit(f"--steps {args.steps}: the train split has only {len(train)} batches")
    shape = tuple(train[0]["input_ids"].shape)
    if args.child:
        step = {"method": "distill", "steps": args.steps, "lr": 1e-4, **CONFIGS[args.child]}
        print(json.dumps({"peak_bytes": measure(built.model, train, step)[1]}))
        return
    speed: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(-1, args.rounds):  # round -1 warms every configuration up, unrecorded
        for name, fields in CONFIGS.items():
            step = {"method": "distill", "steps": args.steps, "lr": 1e-4, **fields}
            tokens_per_s = measure(built.model, train, step)[0]
            if round_ < 0:
                continue
            speed[name].append(tokens_per_s)
            print(f"round {round_ + 1}: {name}: {tokens_per_s:.0f} tokens/s", flush=True)
    memory = {name: child_memory(args, name) for name in CONFIGS}

    base = statistics.median(speed["fp32"])
    header = ["configuration", "tokens/s (median)", "× fp32", "step peak memory MiB (own process)", "runs"]
    rows = [[name, f"{statistics.median(speed[name]):.0f}", f"{statistics.median(speed[name]) / base:.2f}",
             f"{memory[name] / 2**20:.0f}", len(speed[name])] for name in CONFIGS]
    print_table(TITLE, header, rows)
    if args.no_write:
        return
    label = f"code-llama-tiny ({args.size})" if args.model == "code-llama-tiny" else "minilm"
    params = sum(p.numel() for p in built.model.parameters())
    body = "\n\n".join([
        conditions_line(args.threads, args.device, model=label, parameters=f"{params / 1e6:.1f} M",
                        batch=f"{shape[0]} × {shape[1]} tokens", steps_per_run=args.steps, rounds=args.rounds),
        f"Run started {started}; 1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        "the end (the 2 cores are shared with other jobs).",
        "`distill` with `trainable: all`, AdamW, teacher = the model before the recipe. tokens/s counts the "
        "non-padding tokens trained over the step's wall time (teacher forward and optimizer included); peak "
        + ("memory is the resident-set high-water mark during the step minus the resident set before it. "
           if args.device == "cpu" else "memory is torch.cuda.max_memory_allocated during the step minus the "
           "memory allocated before it. ") +
        "Configurations interleaved in rounds; medians over rounds after one unrecorded warm-up round.",
        markdown_table(header, rows),
    ])
    where = "" if args.device == "cpu" else f"-{args.device}"
    write_section(f"{SECTION}-{args.model}{where}", f"{TITLE}: {label}{where.replace('-', ', ')}", body)


if __name__ == "__main__":
    main()
