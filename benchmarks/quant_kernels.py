"""One packed layer, every matmul path: where each of slimline's CPU kernels wins, by rows.

A layer with TinyLlama-1.1B's MLP shape (2048 inputs, 5632 outputs; random weights, rtn
codes) at 1 to 256 rows of float32 x — decode is 1 row, speculative verification a few,
prefill the prompt's length. Paths (``QuantLinear`` picks among them by rows; this script
calls each directly so that every one is timed at every size):

- ``fp32`` / ``bf16``: ``F.linear`` with the float32 weight / the weight and x in bfloat16;
- ``gemv avx2`` / ``gemv avx512``: slimline's float32 kernel (``kernels_gemv``) on each
  instruction set this CPU has (codes widened in registers, float32 maths);
- ``gemv int8-act``: the int8-activation kernel (``decode_activations: int8``, x rounded to
  int8 in blocks of 32: llama.cpp's arithmetic, not the float32 result);
- ``tiles``: the C library dequantizes 4 MiB tiles of float32 rows, torch's GEMM multiplies
  each (``kernels_gemv.tiled_linear``);
- ``torch dequant``: ``F.linear`` with ``QuantLinear.dequantized_weight()`` (torch ops), the
  path before ``tiles``.

Each size's paths run interleaved in one process, medians of ``--runs``; times in ms and as
× ``fp32`` at the same rows (above 1: faster). Grids: int4 groups of 128 and of 32
(llama.cpp Q4_0's), int8 per channel — symmetric, as ``rtn``'s default.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    conditions_line,
    interleaved,
    isa_suffix,
    markdown_table,
    print_table,
    write_section,
)
from slimline.quantize import kernels_gemv as gemv
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import GEMV_MAX_ROWS, QuantLinear

SECTION = "quant-kernels"
GRIDS = {"int4 g128": (4, 128), "int4 g32": (4, 32), "int8 per-channel": (8, None)}


def layer_paths(layer: QuantLinear, weight: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The calls to time for one grid and one x, by path name."""
    w16, x16 = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    q, s, z, b = layer.qweight, layer.scales, layer.zeros, layer.bias
    bits, group = layer.bits, layer.group
    calls: dict[str, Callable[[], object]] = {
        "fp32": lambda: F.linear(x, weight, b),
        "bf16": lambda: F.linear(x16, w16),
    }
    isas = ["avx2"] + (["avx512"] if gemv._library().float_isa == "avx512" else [])
    for isa in isas:
        calls[f"gemv {isa}"] = functools.partial(gemv._gemv, x, q, s, z, b, bits, group, isa=isa)
    if gemv.a8_unsupported(bits, layer.in_features, group) == "":
        calls["gemv int8-act"] = lambda: gemv._gemv(x, q, s, z, b, bits, group, True)
    calls["tiles"] = lambda: gemv.tiled_linear(x, q, s, z, b, bits=bits, group=group)
    calls["torch dequant"] = lambda: F.linear(x, layer.dequantized_weight(), b)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=5632)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    problem = gemv.library_problem()
    if problem:
        raise SystemExit(f"no gemv kernel on this machine: {problem}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(args.out_features, args.in_features) * 0.02
    bias = torch.randn(args.out_features) * 0.02
    sizes = [int(r) for r in args.rows.split(",")]
    header = ["grid", "rows", "path", "ms", "× fp32"]
    table: list[list[object]] = []
    with torch.inference_mode():
        for name, (bits, group) in GRIDS.items():
            q, scales, zeros = quantize_groups(weight, bits, group, True)
            layer = QuantLinear.from_codes(q, scales, zeros, bias=bias, bits=bits, group_size=group,
                                           symmetric=True)
            for rows in sizes:
                x = torch.randn(rows, args.in_features)
                times = interleaved(layer_paths(layer, weight, x), runs=args.runs, warmup=2)
                base = times["fp32"].median_ms
                for path, latency in times.items():
                    table.append([name, rows, path, f"{latency.median_ms:.3f}", f"{base / latency.median_ms:.2f}"])
                print(name, rows, {p: round(t.median_ms, 3) for p, t in times.items()}, flush=True)
    print_table("packed layer paths", header, table)
    body = (conditions_line(args.threads, layer=f"{args.in_features} → {args.out_features}", runs=args.runs,
                            weights="random N(0, 0.02), rtn symmetric codes")
            + f"\n\n`QuantLinear` takes the gemv kernel up to {GEMV_MAX_ROWS} rows of float x (the int8-activation "
            "one where `decode_activations: int8`), `tiles` above (eager CPU inference; torch dequant under "
            "`torch.compile` or with gradients).\n\n" + markdown_table(header, table))
    if not args.no_write:
        kind = isa_suffix()
        write_section(f"{SECTION}-{args.threads}t{kind}",
                      f"Packed-layer matmul paths by rows, {args.threads} thread(s)"
                      + (f" ({kind[1:].upper()} CPU)" if kind else ""), body)


if __name__ == "__main__":
    main()
