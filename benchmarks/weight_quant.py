"""Weight-only quantization on code-llama-tiny and minilm: quality and real bytes.

Rows: fp32, `rtn` int8, int4 g128 and 3-bit g128 (and per-channel), `gptq` where asked.
Quality: test perplexity (code-llama-tiny) or mean cosine of pooled embeddings to fp32
(minilm), on held-out data. Bytes: the quantized layers as stored — packed codes, scales and
zero points, bias — in memory and in the saved `model.safetensors`, against the same layers'
fp32 bytes; and the whole model's bytes against fp32 (embeddings and the output head stay
in full precision unless targeted).
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import conditions_line, markdown_table, print_table, write_section
from benchmarks.pruning import cosine_quality, test_perplexity
from slimline.core.batches import forward, output_tensor
from slimline.core.modules import is_registered_module
from slimline.evaluate.footprint import size_in_memory
from slimline.models import load_builtin

VARIANTS: list[tuple[str, list[dict[str, Any]]]] = [
    ("rtn int8 per-channel", [{"method": "rtn", "bits": 8, "group_size": None}]),
    ("rtn int8 g128", [{"method": "rtn", "bits": 8, "group_size": 128}]),
    ("rtn int4 g128", [{"method": "rtn", "bits": 4, "group_size": 128}]),
    ("rtn int4 per-channel", [{"method": "rtn", "bits": 4, "group_size": None}]),
    ("rtn int3 g128", [{"method": "rtn", "bits": 3, "group_size": 128}]),
]


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its JSON header."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def layer_bytes(model: nn.Module) -> tuple[list[str], int]:
    names = [n for n, m in model.named_modules() if n and is_registered_module(m)]
    mem = sum(t.untyped_storage().nbytes() for n in names for t in model.get_submodule(n).state_dict().values())
    return names, mem


def fp32_bytes(reference: nn.Module, names: list[str]) -> int:
    return sum(p.numel() * 4 for n in names for p in reference.get_submodule(n).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="code-llama-tiny,minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--calibrated", action="store_true", help="add gptq/awq/hqq rows")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = list(VARIANTS)
    if args.calibrated:
        for method in ("gptq", "awq", "hqq"):
            for bits in (4, 3):
                variants.append((f"{method} int{bits} g128",
                                 [{"method": method, "bits": bits, "group_size": 128}]))
        for method in ("rtn", "gptq", "awq"):  # asymmetric grids (hqq's default already)
            variants.append((f"{method} int3 g128 asym",
                             [{"method": method, "bits": 3, "group_size": 128, "symmetric": False}]))
    parts = [conditions_line(args.threads)]
    for name in args.models.split(","):
        built = load_builtin(name)
        calib = built.batches("train", batch_size=8, limit=args.calib_batches)
        data = built.batches("test", batch_size=16, limit=args.eval_batches)
        if built.task == "embedding":
            reference = [output_tensor(forward(built.model, b), b).float() for b in data]
            metric = "cosine to fp32"

            def quality(m: nn.Module, reference: list[torch.Tensor] = reference,
                        data: list[Any] = data) -> float:
                return cosine_quality(m, reference, data)
        else:
            metric = "test perplexity"

            def quality(m: nn.Module, data: list[Any] = data) -> float:
                return test_perplexity(m, data)
        base_q = quality(built.model)
        base_mem = size_in_memory(built.model)
        with tempfile.TemporaryDirectory() as tmp:
            sl.save(built.model, Path(tmp) / "m")
            base_disk = (Path(tmp) / "m" / "model.safetensors").stat().st_size
        header = ["variant", metric, "vs fp32", "quantize s", "layers mem × fp32", "layers disk × fp32",
                  "model mem × fp32", "model disk × fp32"]
        rows: list[list[Any]] = [["fp32", f"{base_q:.4f}", "-", "-", "1", "1", "1", "1"]]
        for label, steps in variants:
            start = time.perf_counter()
            result = sl.compress(built.model, {"steps": steps}, calibration=calib)
            seconds = time.perf_counter() - start
            q = quality(result.model)
            names, mem = layer_bytes(result.model)
            ref = fp32_bytes(built.model, names)
            with tempfile.TemporaryDirectory() as tmp:
                sl.save(result.model, Path(tmp) / "m")
                weights = Path(tmp) / "m" / "model.safetensors"
                sizes = safetensors_sizes(weights)
                disk = sum(v for k, v in sizes.items() if any(k.startswith(n + ".") for n in names))
                whole_disk = weights.stat().st_size
            change = (q / base_q - 1) * 100
            rows.append([label, f"{q:.4f}", f"{change:+.2f}%", f"{seconds:.1f}", f"{mem / ref:.3f}",
                         f"{disk / ref:.3f}", f"{size_in_memory(result.model) / base_mem:.3f}",
                         f"{whole_disk / base_disk:.3f}"])
        print_table(f"weight quantization: {name}", header, rows)
        parts += [f"**{name}** — calibration {args.calib_batches}×8 train items (gptq, awq); "
                  f"evaluation {args.eval_batches}×16 test items", markdown_table(header, rows)]
    if not args.no_write:
        write_section("weight-quant", "Weight-only quantization: quality and bytes", "\n\n".join(parts))


if __name__ == "__main__":
    main()
