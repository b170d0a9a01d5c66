"""Mixed-precision weight quantization on code-llama-tiny: perplexity against stored bits.

Rows: `rtn` and `gptq` at uniform 3 and 4 bits (g128, symmetric) and with `average_bits`
budgets between and at them (widths from `bit_choices`, chosen per layer by the sensitivity
of `slimline.quantize.mixed` on the calibration data). Stored bits per weight count the packed codes, scales
and zero points of the quantized layers, as their buffers hold them; layer bytes add the bias
and are compared with the same layers in fp32, in memory and in the saved safetensors.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import slimline as sl
from benchmarks.harness import conditions_line, markdown_table, print_table, write_section
from benchmarks.pruning import test_perplexity
from slimline.models import load_builtin
from slimline.quantize.mixed import layer_stored_bits
from slimline.quantize.qlinear import QuantLinear


def layer_bytes(model: nn.Module) -> tuple[list[str], int]:
    """The quantized layers' names and the bytes of all their buffers (bias included)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    held = sum(t.numel() * t.element_size() for n in names
               for t in model.get_submodule(n).state_dict().values())
    return names, held


def fp32_bytes(reference: nn.Module, names: list[str]) -> int:
    return sum(p.numel() * 4 for n in names for p in reference.get_submodule(n).parameters())


def variants(methods: list[str], budgets: list[float], choices: list[int] | None) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for method in methods:
        for bits in (3, 4):
            rows.append((f"{method} int{bits} g128", {"method": method, "bits": bits}))
        for budget in budgets:
            step: dict[str, Any] = {"method": method, "average_bits": budget}
            if choices:
                step["bit_choices"] = choices
            rows.append((f"{method} mixed {budget:g}", step))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--budgets", default="3.25,3.5,4.125")
    parser.add_argument("--bit-choices", default="", help="e.g. 2,3,4,8 (default: the config's)")
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    choices = [int(b) for b in args.bit_choices.split(",")] if args.bit_choices else None
    budgets = [float(b) for b in args.budgets.split(",") if b]
    built = load_builtin("code-llama-tiny")
    calib = built.batches("train", batch_size=8, limit=args.calib_batches)
    data = built.batches("test", batch_size=8, limit=args.eval_batches)
    base = test_perplexity(built.model, data)
    header = ["variant", "widths", "stored bits/weight", "test perplexity", "vs fp32",
              "layers mem × fp32", "layers disk × fp32", "quantize s"]
    rows: list[list[Any]] = [["fp32", "-", "32", f"{base:.4f}", "-", "1", "1", "-"]]
    for label, step in variants(args.methods.split(","), budgets, choices):
        start = time.perf_counter()
        result = sl.compress(built.model, {"steps": [step]}, calibration=calib)
        seconds = time.perf_counter() - start
        ppl = test_perplexity(result.model, data)
        names, mem = layer_bytes(result.model)
        layers = [result.model.get_submodule(n) for n in names]
        weights = sum(m.in_features * m.out_features for m in layers if isinstance(m, QuantLinear))
        stored = sum(layer_stored_bits(m) for m in layers)
        mix = Counter(m.bits for m in layers if isinstance(m, QuantLinear))
        ref = fp32_bytes(built.model, names)
        with tempfile.TemporaryDirectory() as tmp:
            sl.save(result.model, Path(tmp) / "m")
            saved = load_file(str(Path(tmp) / "m" / "model.safetensors"))
            disk = sum(t.numel() * t.element_size() for k, t in saved.items()
                       if any(k.startswith(n + ".") for n in names))
        rows.append([label, ", ".join(f"{b}b×{mix[b]}" for b in sorted(mix)),
                     f"{stored / weights:.3f}", f"{ppl:.4f}", f"{(ppl / base - 1) * 100:+.2f}%",
                     f"{mem / ref:.4f}", f"{disk / ref:.4f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    print_table("mixed precision: code-llama-tiny", header, rows)
    cond = conditions_line(args.threads, calibration=f"{args.calib_batches}×8 train items",
                           evaluation=f"{args.eval_batches}×8 test items",
                           bit_choices=args.bit_choices or "default")
    if not args.no_write:
        write_section("mixed-precision", "Mixed precision: perplexity against stored bits",
                      cond + "\n\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
