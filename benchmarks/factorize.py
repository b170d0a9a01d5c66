"""Low-rank factorization: quality, parameters, time and latency against the dense model.

SKELETON — written with the methods (issue 12), not yet run; no figure from it is in
BENCHMARKS.md. What it measures, in one process:

* `code-llama-tiny` at 80% and 60% of the target layers' weights: test perplexity for `svd`,
  `asvd`, `svd_llm` with uniform and allocated ranks, factorization seconds, parameters, and
  latency (prefill of one sequence, interleaved with the dense model);
* `digits-cnn` with `tucker` at 50% of its conv weights: test accuracy and latency against
  dense and against `structured` channel pruning.

Still to add (see the issue): minilm cosine and latency, decode latency, `+ distill` rows.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import (
    conditions_line,
    interleaved,
    markdown_table,
    print_table,
    write_section,
)
from benchmarks.pruning import test_perplexity
from slimline.core.batches import forward
from slimline.models import load_builtin


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _latency_ms(models: dict[str, nn.Module], batch: Any, runs: int) -> dict[str, float]:
    calls = {name: (lambda m=m: forward(m, batch)) for name, m in models.items()}
    with torch.inference_mode():
        found = interleaved(calls, runs=runs, warmup=3)
    return {name: lat.median_ms for name, lat in found.items()}


def llm_rows(args: argparse.Namespace) -> tuple[list[str], list[list[Any]]]:
    built = load_builtin("code-llama-tiny")
    calib = built.batches("train", batch_size=args.calib_batch, limit=args.calib_batches)
    test = built.batches("test", batch_size=4, limit=args.test_batches)
    models: dict[str, nn.Module] = {"dense": built.model}
    rows = [["dense", "-", "-", f"{test_perplexity(built.model, test):.3f}", _params(built.model), "-"]]
    for ratio in (0.8, 0.6):
        for method in ("svd", "asvd", "svd_llm"):
            for allocation in ("uniform", "sensitivity"):
                step = {"method": method, "ratio": ratio, "allocation": allocation}
                start = time.perf_counter()
                out = sl.compress(built.model, {"steps": [step]}, calibration=calib).model
                seconds = time.perf_counter() - start
                models[f"{method}/{allocation}@{ratio}"] = out
                rows.append([method, allocation, ratio, f"{test_perplexity(out, test):.3f}",
                             _params(out), f"{seconds:.1f}"])
    latency = _latency_ms(models, test[0], args.runs)
    header = ["method", "ranks", "ratio", "test ppl", "params", "factorize s", "latency ms"]
    for row, name in zip(rows, models, strict=True):
        row.append(f"{latency[name]:.2f}")
    return header, rows


def cnn_rows(args: argparse.Namespace) -> tuple[list[str], list[list[Any]]]:
    from slimline.models.digits_cnn import accuracy, digits_splits

    built = load_builtin("digits-cnn")
    test = digits_splits()["test"]
    calib = built.batches("train", batch_size=64, limit=4)
    recipes = {"dense": [], "tucker 0.5": [{"method": "tucker", "ratio": 0.5}],
               "tucker vbmf": [{"method": "tucker", "rank": "vbmf"}],
               "structured channels 0.3": [{"method": "structured", "sparsity": 0.3,
                                            "units": ["channels"]}]}
    models = {name: sl.compress(built.model, {"steps": steps}, calibration=calib).model
              for name, steps in recipes.items()}
    latency = _latency_ms(models, test["pixel_values"][:64], args.runs)
    rows = [[name, f"{accuracy(m, test):.4f}", _params(m), f"{latency[name]:.3f}"]
            for name, m in models.items()]
    return ["model", "test accuracy", "params", "latency ms (64 images)"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--test-batches", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    body = conditions_line(args.threads, runs=args.runs) + "\n\n"
    for title, (header, rows) in (("code-llama-tiny", llm_rows(args)),
                                  ("digits-cnn", cnn_rows(args))):
        print_table(title, header, rows)
        body += f"### {title}\n\n{markdown_table(header, rows)}\n"
    if args.write:
        write_section("factorize", "Low-rank factorization", body)


if __name__ == "__main__":
    main()
