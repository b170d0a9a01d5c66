"""Packed and FP8 layers on a GPU: each path checked against the textbook product, and timed
against bfloat16 ``F.linear``.

The first thing to run on a lent GPU (``benchmarks/device_check.sh``): slimline's CUDA paths
are tested on the CPU for shapes, byte order and path choice, but only a GPU runs the
kernels. Per layer shape (TinyLlama-1.1B's: attention 2048 → 2048, MLP 2048 → 5632 and
5632 → 2048; random N(0, 0.02) weights) and rows of bfloat16 x:

- ``bf16``: ``F.linear`` with the bfloat16 weight (what a user's ``half`` model runs);
- ``int4 g128`` / ``int8 per-channel``: ``QuantLinear`` as ``forward`` runs it (the path
  column names the kernel ``kernel_path`` picked: ``int4pack_cuda`` is tinygemm,
  ``int8pack_cuda`` torch's CUDA int8 kernel), and ``… dequant``: the same layer forced
  through dequantize + ``F.linear`` (what runs where no kernel fits), so the row thresholds
  of ``slimline.quantize.kernels_cuda`` can be read off;
- ``fp8 e4m3 row`` / ``fp8 e4m3 tensor``: ``Fp8Linear`` with per-row / per-tensor scales
  (``torch._scaled_mm`` on FP8 tensor cores where ``_scaled_mm_ok``; the path column says).

Timing: each call runs x through ``--layers`` distinct copies of the shape (different random
weights, together well beyond the GPU's L2 cache, as a decode step reads a model's layers
from memory), between device synchronisations; medians of interleaved runs, µs per layer,
GB/s of stored weight bytes per layer call, × the bf16 row. Error: the first copy's output
against float32 ``x @ Wᵀ`` with that path's own (dequantized) weight, as the largest
difference over the largest reference magnitude.

``--device cpu`` runs the same script on the CPU paths (a check of the script, not a table
to keep).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import (
    conditions_line,
    interleaved,
    markdown_table,
    print_table,
    write_section,
)
from slimline.quantize import kernels_cuda
from slimline.quantize.fp8 import Fp8Linear
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import QuantLinear

SECTION = "quant-kernels-cuda"
SHAPES = {"attn 2048→2048": (2048, 2048), "mlp 2048→5632": (2048, 5632), "mlp 5632→2048": (5632, 2048)}


def quant_layer(weight: torch.Tensor, bits: int, group: int | None) -> QuantLinear:
    q, scales, zeros = quantize_groups(weight, bits, group, True)
    return QuantLinear.from_codes(q, scales, zeros, bias=None, bits=bits, group_size=group, symmetric=True)


def fp8_layer(weight: torch.Tensor, scale: str) -> Fp8Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return Fp8Linear.from_float(linear, "e4m3", scale)  # type: ignore[arg-type]


def stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def build(in_features: int, out_features: int, copies: int, device: str) -> dict[str, list[nn.Module]]:
    """``copies`` distinct layers of each variant, made on the CPU, moved to ``device``."""
    layers: dict[str, list[nn.Module]] = {k: [] for k in ("bf16", "int4 g128", "int8 per-channel",
                                                          "fp8 e4m3 row", "fp8 e4m3 tensor")}
    for index in range(copies):
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(index)) * 0.02
        dense = nn.Linear(in_features, out_features, bias=False)
        dense.weight.data = weight.clone()
        layers["bf16"].append(dense.to(torch.bfloat16))
        layers["int4 g128"].append(quant_layer(weight, 4, 128))
        layers["int8 per-channel"].append(quant_layer(weight, 8, None))
        layers["fp8 e4m3 row"].append(fp8_layer(weight.clone(), "channel"))
        layers["fp8 e4m3 tensor"].append(fp8_layer(weight.clone(), "tensor"))
    return {k: [m.to(device).eval() for m in v] for k, v in layers.items()}


def reference_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, QuantLinear | Fp8Linear):
        return layer.dequantized_weight(torch.float32)
    return layer.weight.float()


def calls_for(layers: dict[str, list[nn.Module]], x: torch.Tensor) -> dict[str, Callable[[], object]]:
    def through(stack: list[nn.Module], call: Callable[[nn.Module], object]) -> Callable[[], object]:
        return lambda: [call(layer) for layer in stack]

    calls: dict[str, Callable[[], object]] = {}
    for name, stack in layers.items():
        calls[name] = through(stack, lambda layer: layer(x))
        if isinstance(stack[0], QuantLinear):
            calls[f"{name} dequant"] = through(
                stack, lambda layer: F.linear(x, layer.dequantized_weight(x.dtype)))
    return calls


def path_of(name: str, layer: nn.Module, x: torch.Tensor) -> str:
    if name.endswith(" dequant"):
        return "dequant"
    if isinstance(layer, QuantLinear):
        return layer.kernel_path(x)
    if isinstance(layer, Fp8Linear):
        from slimline.quantize.fp8 import _scaled_mm_ok

        return "_scaled_mm" if _scaled_mm_ok(layer, x) else "dequant"
    return "F.linear"


def error_of(name: str, layer: nn.Module, x: torch.Tensor) -> float:
    ref = x.float() @ reference_weight(layer).t()
    if name.endswith(" dequant"):
        assert isinstance(layer, QuantLinear)
        out = F.linear(x, layer.dequantized_weight(x.dtype))
    else:
        out = layer(x)
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--rows", default="1,8,16,32,64,128,2048")
    parser.add_argument("--layers", type=int, default=24, help="distinct copies of each shape a call runs through")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (use --device cpu to check the script)")
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    sizes = [int(r) for r in args.rows.split(",")]
    header = ["layer", "rows", "variant", "path", "µs/layer", "× bf16", "GB/s of weights", "max error / max |ref|"]
    table: list[list[object]] = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            in_features, out_features = SHAPES[shape]
            layers = build(in_features, out_features, args.layers, args.device)
            for rows in sizes:
                x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
                x = x.to(device=args.device, dtype=torch.bfloat16)
                calls = calls_for(layers, x)
                times = interleaved(calls, runs=args.runs, warmup=3, sync=sync)
                base = times["bf16"].median_ms
                for name, latency in times.items():
                    stack = layers[name.removesuffix(" dequant")]
                    per_layer_s = latency.median_ms / 1e3 / len(stack)
                    table.append([shape, rows, name, path_of(name, stack[0], x),
                                  f"{per_layer_s * 1e6:.1f}", f"{base / latency.median_ms:.2f}",
                                  f"{stored_bytes(stack[0]) / per_layer_s / 1e9:.0f}",
                                  f"{error_of(name, stack[0], x):.1e}"])  # fmt: skip
                print(shape, rows, {n: round(t.median_ms * 1e3 / args.layers, 1) for n, t in times.items()},
                      flush=True)
            del layers
    print_table("packed and fp8 layer paths", header, table)
    body = (conditions_line(args.threads, args.device, layers_per_call=args.layers, runs=args.runs,
                            weights="random N(0, 0.02), symmetric codes", x="bfloat16")
            + f"\n\nRow limits of the packed CUDA kernels in `QuantLinear`: int4 up to "
              f"{kernels_cuda.INT4_MAX_ROWS} rows, int8 up to {kernels_cuda.INT8_MAX_ROWS}; "
              "past them it dequantizes (the `… dequant` rows).\n\n" + markdown_table(header, table))
    if not args.no_write and args.device == "cuda":
        write_section(SECTION, "Packed and FP8 layer paths on a GPU", body)


if __name__ == "__main__":
    main()
