"""minilm on CPU: fp32 vs half, int8_dynamic, smoothquant (eager and compiled), peers; one run.

Rows, interleaved in one process: fp32, `half` (bf16), `int8_dynamic`, `smoothquant`
(dynamic and static activations), each alone and + `compile`, `half` + `compile`, torchao
int8 dynamic + torch.compile, and torch's `quantize_dynamic`. smoothquant calibrates on
train-split sentences. Quality is the mean cosine of the pooled sentence embeddings to fp32 on
held-out (test split) standard-library docstring sentences.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
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
from slimline.core.batches import forward, output_tensor
from slimline.models import load_builtin


def _torchao_int8_dynamic(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    peer = copy.deepcopy(model)
    quantize_(peer, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(peer)


def _torch_quantize_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


SQ_STATIC = {"method": "smoothquant", "activations": "static", "alpha": None}


def build_variants(
    base: nn.Module, calibration: list[Any]
) -> dict[str, tuple[nn.Module | None, str]]:
    recipes: dict[str, list[dict[str, Any]]] = {
        "half (bf16)": [{"method": "half"}],
        "int8_dynamic": [{"method": "int8_dynamic"}],
        "int8_dynamic + compile": [{"method": "int8_dynamic"}, {"method": "compile"}],
        "smoothquant": [{"method": "smoothquant"}],
        "smoothquant + compile": [{"method": "smoothquant"}, {"method": "compile"}],
        "smoothquant static + compile": [SQ_STATIC, {"method": "compile"}],
        "half + compile": [{"method": "half"}, {"method": "compile"}],
    }
    variants: dict[str, tuple[nn.Module | None, str]] = {"fp32": (base, "")}
    for name, steps in recipes.items():
        result = sl.compress(base, {"steps": steps}, calibration=calibration)
        variants[name] = (result.model, "slimline")
    peers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "torchao int8-dyn + compile": _torchao_int8_dynamic,
        "torch quantize_dynamic": _torch_quantize_dynamic,
    }
    for name, make in peers.items():
        try:
            variants[name] = (make(base), "peer")
        except Exception as exc:  # a peer's failure is reported in the table, not hidden
            variants[name] = (None, f"peer failed: {type(exc).__name__}: {exc}"[:120])
    return variants


def embeddings(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [output_tensor(forward(model, b), b).float() for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="held-out batches for cosine")
    parser.add_argument("--calib-batches", type=int, default=8, help="smoothquant calibration")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    built = load_builtin("minilm")
    data = built.batches("test", batch_size=args.batch_size, limit=args.batches)
    timing_batch = data[0]
    calibration = built.batches("train", batch_size=args.batch_size, limit=args.calib_batches)
    variants = build_variants(built.model, calibration)
    reference = embeddings(built.model, data)
    cosines: dict[str, float] = {}
    for name, (model, _) in variants.items():
        if model is None:
            continue
        outs = embeddings(model, data)  # also warms up (and compiles) on every shape
        cos = [torch.nn.functional.cosine_similarity(o, r, dim=-1) for o, r in zip(outs, reference, strict=True)]
        cosines[name] = float(torch.cat(cos).mean())
    live = {n: m for n, (m, _) in variants.items() if m is not None}

    def call(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return forward(model, timing_batch)

        return run

    timings = interleaved({n: call(m) for n, m in live.items()}, runs=args.runs, warmup=args.warmup)
    fp32 = timings["fp32"].median_ms
    header = ["variant", "latency ms (median)", "p95 ms", "× fp32", "cosine to fp32", "note"]
    rows = []
    for name, (_, note) in variants.items():
        if name not in timings:
            rows.append([name, "-", "-", "-", "-", note])
            continue
        t = timings[name]
        rows.append([name, f"{t.median_ms:.1f}", f"{t.p95_ms:.1f}", f"{t.median_ms / fp32:.3f}",
                     f"{cosines[name]:.5f}", note])
    seq = timing_batch["input_ids"].shape[1]
    cond = conditions_line(args.threads, batch_size=args.batch_size, timing_seq_len=seq,
                           runs=args.runs, warmup=args.warmup,
                           cosine_sentences=sum(b["input_ids"].shape[0] for b in data))
    print_table("minilm (all-MiniLM-L6-v2) on CPU", header, rows)
    print(cond)
    if not args.no_write:
        write_section("minilm-cpu", "minilm on CPU: int8_dynamic, smoothquant, half, compile and peers",
                      cond + "\n\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
