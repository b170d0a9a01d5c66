"""Unstructured and N:M pruning quality: dense, magnitude, wanda, sparsegpt (± OWL).

minilm: mean cosine of pooled embeddings to the dense model on held-out sentences.
code-llama-tiny: test perplexity. Pruning time per method in the same table. Calibration is
drawn from the train split, evaluation from the test split (split by module file).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import conditions_line, markdown_table, print_table, write_section
from slimline.core.batches import forward, output_tensor
from slimline.evaluate.metrics import next_token_nll, perplexity
from slimline.models import load_builtin

SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("30%", {"sparsity": 0.3}), ("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}),
]


def methods(include_swiftprune: bool) -> list[tuple[str, str, dict[str, Any]]]:
    names = ["magnitude", "wanda", "sparsegpt"] + (["swiftprune"] if include_swiftprune else [])
    out = []
    for name in names:
        out.append((name, name, {}))
        out.append((f"{name}+owl", name, {"owl": True}))
    return out


def cosine_quality(model: nn.Module, reference: list[torch.Tensor], data: list[Any]) -> float:
    with torch.inference_mode():
        cos = [torch.nn.functional.cosine_similarity(output_tensor(forward(model, b), b).float(), r, dim=-1)
               for b, r in zip(data, reference, strict=True)]
    return float(torch.cat(cos).mean())


def test_perplexity(model: nn.Module, data: list[Any]) -> float:
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for b in data:
            logits = output_tensor(forward(model, b), b).float()
            s, n = next_token_nll(logits, b["input_ids"], b.get("attention_mask"))
            nll, tokens = nll + float(s), tokens + int(n)
    return perplexity(nll, tokens)


def run_model(name: str, args: argparse.Namespace) -> tuple[list[str], list[list[Any]], str]:
    built = load_builtin(name)
    calib = built.batches("train", batch_size=args.calib_batch, limit=args.calib_batches)
    data = built.batches("test", batch_size=args.eval_batch, limit=args.eval_batches)
    if built.task == "embedding":
        reference = [output_tensor(forward(built.model, b), b).float() for b in data]
        metric, dense = "cosine to dense", 1.0

        def quality(m: nn.Module) -> float:
            return cosine_quality(m, reference, data)
    else:
        metric, quality = "test perplexity", (lambda m: test_perplexity(m, data))
        dense = quality(built.model)
    header = ["method", *[f"{label} {metric}" for label, _ in SETTINGS], *[f"{label} s" for label, _ in SETTINGS]]
    rows: list[list[Any]] = [["dense", *[f"{dense:.4f}"] * len(SETTINGS), *["-"] * len(SETTINGS)]]
    for label, method, extra in methods(args.swiftprune):
        scores, seconds = [], []
        for _, spec in SETTINGS:
            if "pattern" in spec and extra.get("owl"):
                scores.append("n/a (OWL is unstructured)")
                seconds.append("-")
                continue
            start = time.perf_counter()
            try:
                pruned = sl.compress(built.model, {"steps": [{"method": method, **spec, **extra}]},
                                     calibration=calib).model
            except Exception as exc:  # report, don't hide
                scores.append(f"failed: {exc}"[:60])
                seconds.append("-")
                continue
            seconds.append(f"{time.perf_counter() - start:.1f}")
            scores.append(f"{quality(pruned):.4f}")
        rows.append([label, *scores, *seconds])
    cond = (f"{name}: calibration {args.calib_batches}×{args.calib_batch} train items; "
            f"evaluation {args.eval_batches}×{args.eval_batch} test items")
    return header, rows, cond


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="minilm,code-llama-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--swiftprune", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = [conditions_line(args.threads)]
    for name in args.models.split(","):
        header, rows, cond = run_model(name, args)
        print_table(f"pruning: {name}", header, rows)
        parts += [f"**{name}** — {cond}", markdown_table(header, rows)]
    if not args.no_write:
        write_section("pruning-unstructured", "Unstructured and N:M pruning", "\n\n".join(parts))


if __name__ == "__main__":
    main()
