"""Static activation quantization on minilm: where its loss comes from, and what falling back
to per-token dynamic quantization layer by layer buys.

``smoothquant`` with static activations (one calibrated scale and zero point per tensor, α and
the clip searched per layer) and with dynamic ones (a scale per token), both from the same
calibration batches. Then, on the static model, each W8A8 layer in turn is switched to dynamic
activations alone (same smoothing and int8 weights; only the activation grid changes) and
the cosine it recovers is measured; the layers are ranked by it and switched cumulatively, the
most helpful first: how many layers must go dynamic before the model reaches a target cosine.
The ranking is made on validation batches and the curve reported on test batches.

Quality: mean cosine of the mean-pooled embeddings to fp32 (as ``cpu_deploy``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import (
    conditions_line,
    isa_suffix,
    markdown_table,
    print_table,
    write_section,
)
from benchmarks.pruning import cosine_quality
from slimline.core.batches import forward, output_tensor
from slimline.models import load_builtin
from slimline.quantize.w8a8 import SmoothQuantLinear

SECTION = "static-activations"
COUNTS = (0, 1, 2, 4, 8, 12, 18, 24, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="validation / test batches of 32")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    built = load_builtin("minilm")
    model = built.model.eval()
    calib = built.batches("train", batch_size=32, limit=args.calib_batches)
    splits = {s: built.batches(s, batch_size=32, limit=args.batches) for s in ("validation", "test")}
    with torch.inference_mode():
        refs = {s: [output_tensor(forward(model, b), b).float() for b in bs] for s, bs in splits.items()}

    def cos(m: nn.Module, split: str) -> float:
        return cosine_quality(m, refs[split], splits[split])

    dynamic = sl.compress(model, [{"method": "smoothquant", "activations": "dynamic", "alpha": None}],
                          calibration=calib).model
    static = sl.compress(model, [{"method": "smoothquant", "activations": "static", "alpha": None}],
                         calibration=calib).model
    layers = {n: m for n, m in static.named_modules() if isinstance(m, SmoothQuantLinear)}
    base = cos(static, "validation")
    gains = []
    for name, layer in layers.items():  # one layer dynamic at a time, ranked on validation
        layer.static = False
        gains.append((cos(static, "validation") - base, name))
        layer.static = True
    gains.sort(reverse=True)
    rows = [["all dynamic (smoothquant, α searched)", len(layers), f"{cos(dynamic, 'test'):.5f}", ""]]
    for k in (c for c in COUNTS if c <= len(layers)):
        for _, name in gains[:k]:
            layers[name].static = False
        note = ", ".join(n.removeprefix("encoder.layer.") for _, n in gains[:k]) if 0 < k <= 4 else ""
        rows.append([f"static, {k} most helpful layers dynamic", k, f"{cos(static, 'test'):.5f}", note])
        for _, name in gains[:k]:
            layers[name].static = True
    header = ["variant", "dynamic layers", "cosine to fp32 (test)", "layers switched"]
    print_table("static activations: minilm", header, rows)
    top = "; ".join(f"{n.removeprefix('encoder.layer.')} {g:+.5f}" for g, n in gains[:6])
    body = (conditions_line(args.threads, calibration=f"{args.calib_batches} train batches of 32",
                            ranking=f"{args.batches} validation batches of 32",
                            quality=f"{args.batches} test batches of 32, mean cosine of mean-pooled embeddings")
            + f"\n\n{len(layers)} W8A8 layers. Cosine recovered on validation by switching one layer alone "
            f"(the six largest): {top}.\n\n" + markdown_table(header, rows))
    if not args.no_write:
        kind = isa_suffix()
        write_section(f"{SECTION}{kind}", "Static activation quantization: minilm, layer-wise fallback to dynamic"
                      + (f" ({kind[1:].upper()} CPU)" if kind else ""), body)


if __name__ == "__main__":
    main()
