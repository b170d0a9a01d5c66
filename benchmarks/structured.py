"""Structured pruning, layer dropping and sparse storage: real speed and real bytes.

* `structured` on minilm at 30% and 50% of heads and MLP neurons: latency (interleaved with
  fp32) and mean cosine of pooled embeddings to fp32 on held-out sentences; beside it, in the
  same run, Torch-Pruning (DepGraph, arXiv 2301.12900) at the same ratio, L2-magnitude
  importance, heads and neurons, and slimline with that same criterion and no repair.
* `layer_drop` on code-llama-tiny: test perplexity after dropping 1 and 2 blocks by Block
  Influence (ShortGPT, arXiv 2403.03853) versus dropping the last blocks.
* Saved size of unstructured (50%) and 2:4 pruned minilm with bitmask + values storage.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
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
from benchmarks.pruning import cosine_quality, test_perplexity
from benchmarks.weight_quant import safetensors_sizes
from slimline.core.batches import forward, output_tensor
from slimline.models import load_builtin


def torch_pruning_bert(model: nn.Module, example: dict[str, torch.Tensor], ratio: float) -> nn.Module:
    """Torch-Pruning's MetaPruner on a BERT encoder: whole heads and MLP neurons, L2 magnitude.

    DepGraph puts every tensor that shares the 384-wide residual stream (embeddings, every
    LayerNorm, each block's output projections, the model output) in one group, and prunes it
    like any other unless a member is ignored. Listing the embeddings in ``ignored_layers`` pins
    that width, so only heads and neurons go, as in slimline's rows. (Unpinned, TP cuts the
    residual width by the ratio too, and with a scalar ``output_transform`` such as
    ``.sum()`` its OutputPruner fails on the 0-d output: ``layer.shape[1]``, IndexError.)
    ``example`` is only traced: magnitude importance reads no data.
    """
    import torch_pruning as tp

    peer = copy.deepcopy(model)
    attention: list[Any] = [m for m in peer.modules() if type(m).__name__ == "BertSelfAttention"]
    num_heads = {lin: m.num_attention_heads for m in attention for lin in (m.query, m.key, m.value)}
    pruner = tp.pruner.MetaPruner(
        peer, example_inputs=dict(example), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=[peer.embeddings, peer.pooler],
        output_transform=lambda out: out.last_hidden_state,
    )
    pruner.step()
    for m in attention:  # transformers 5 reshapes with -1 heads; keep the attributes true anyway
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
        if m.all_head_size != m.num_attention_heads * m.attention_head_size:
            raise RuntimeError(f"Torch-Pruning left {m.all_head_size} q features for {m.num_attention_heads} heads")
    return peer


SLIMLINE_NOTE = "slimline: activation importance + least-squares repair (defaults)"
MAGNITUDE_NOTE = "slimline: L2 magnitude, no repair (Torch-Pruning's criterion)"
TP_NOTE = "peer: Torch-Pruning {version}, L2 group magnitude; embeddings + pooler in ignored_layers"


def structured_section(args: argparse.Namespace) -> str:
    built = load_builtin("minilm")
    calib = built.batches("train", batch_size=8, limit=args.calib_batches)
    data = built.batches("test", batch_size=32, limit=4)
    reference = [output_tensor(forward(built.model, b), b).float() for b in data]
    variants: dict[str, nn.Module | None] = {"fp32": built.model}
    notes: dict[str, str] = {}
    example = calib[0]
    if not isinstance(example, Mapping):
        raise TypeError("minilm batches are dicts")
    for ratio in (0.3, 0.5):
        step = {"method": "structured", "sparsity": ratio, "units": ["heads", "neurons"]}
        name = f"structured {ratio:.0%}"
        variants[name] = sl.compress(built.model, {"steps": [step]}, calibration=calib).model
        notes[name] = SLIMLINE_NOTE
        name = f"structured {ratio:.0%} magnitude"
        plain = {**step, "importance": "magnitude", "reconstruct": False}
        variants[name] = sl.compress(built.model, {"steps": [plain]}).model
        notes[name] = MAGNITUDE_NOTE
        name = f"Torch-Pruning {ratio:.0%}"
        try:
            variants[name] = torch_pruning_bert(built.model, dict(example), ratio)
            notes[name] = TP_NOTE.format(version=metadata.version("torch-pruning"))
        except Exception as exc:  # the peer's failure is part of the result
            variants[name] = None
            notes[name] = f"failed: {type(exc).__name__}: {exc}"[:100]
    live = {n: m for n, m in variants.items() if m is not None}
    batch = data[0]
    if not isinstance(batch, Mapping):
        raise TypeError("minilm batches are dicts")

    def call(model: nn.Module) -> Any:
        def run() -> object:
            with torch.inference_mode():
                return forward(model, batch)

        return run

    times = interleaved({n: call(m) for n, m in live.items()}, runs=args.runs, warmup=3)
    base = times["fp32"].median_ms
    header = ["variant", "latency ms", "speed-up × fp32", "params", "heads / layer", "MLP neurons / layer",
              "cosine to fp32", "note"]
    rows = []
    for name, model in variants.items():
        if model is None:
            rows.append([name, "-", "-", "-", "-", "-", "-", notes[name]])
            continue
        t = times[name].median_ms
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, f"{t:.1f}", f"{base / t:.2f}", f"{params / 1e6:.2f}M", *bert_widths(model),
                     f"{cosine_quality(model, reference, data):.4f}", notes.get(name, "")])
    print_table("structured pruning: minilm", header, rows)
    by_shape: dict[tuple[tuple[int, ...], ...], list[str]] = {}
    for n, m in live.items():  # rows with identical parameter shapes differ in timing only by noise
        by_shape.setdefault(tuple(tuple(p.shape) for p in m.parameters()), []).append(n)
    spreads = []
    for names in by_shape.values():
        same = [times[n].median_ms for n in names]
        if len(same) > 1:
            spreads.append(f"{(max(same) - min(same)) / min(same):.0%} among {', '.join(names)}")
    noise = (" Rows with identical parameter shapes differ only by timing noise; the spread of their "
             f"medians: {'; '.join(spreads)}." if spreads else "")
    seq = batch["input_ids"].shape[1]
    hidden = built.model.config.hidden_size  # type: ignore[union-attr]
    return (f"**minilm**, batch 32 × {seq} tokens, {args.runs} interleaved runs (all rows alternate in one "
            f"loop); calibration {args.calib_batches}×8 train sentences (slimline's default rows only); "
            "cosine of mean-pooled `last_hidden_state` on 128 test sentences. Every row is pruned from the "
            "same fp32 model, timed on the same batch by the same loop and pooled by the same "
            "`output_tensor`. Torch-Pruning traces one train batch; its L2 importance reads no data. "
            f"Its call lists `embeddings` in `ignored_layers`, which pins the {hidden}-wide residual "
            "stream; without it DepGraph prunes that width by the ratio too (and, traced through a scalar "
            "`output_transform` such as `.sum()`, fails with IndexError in its OutputPruner), so with it "
            "Torch-Pruning removes the same units as slimline." + noise + "\n\n"
            + markdown_table(header, rows))


def bert_widths(model: nn.Module) -> list[str]:
    """Heads and intermediate neurons per encoder layer, as ``8`` or ``8-9`` when they differ."""
    heads: set[int] = set()
    neurons: set[int] = set()
    modules: list[Any] = list(model.modules())
    for m in modules:
        kind = type(m).__name__
        if kind == "BertSelfAttention":
            heads.add(m.query.out_features // m.attention_head_size)
        elif kind == "BertIntermediate":
            neurons.add(m.dense.out_features)
    return ["-".join(str(v) for v in sorted({min(s), max(s)})) for s in (heads, neurons)]


def layer_drop_section(args: argparse.Namespace) -> str:
    built = load_builtin("code-llama-tiny")
    calib = built.batches("train", batch_size=8, limit=args.calib_batches)
    data = built.batches("test", batch_size=16, limit=8)
    header = ["blocks dropped", "Block Influence: test perplexity", "last blocks: test perplexity"]
    rows: list[list[Any]] = [["0", f"{test_perplexity(built.model, data):.2f}", "-"]]
    for n in (1, 2):
        cells = [str(n)]
        for criterion in ("block_influence", "last"):
            step = {"method": "layer_drop", "n_layers": n, "criterion": criterion}
            model = sl.compress(built.model, {"steps": [step]}, calibration=calib).model
            cells.append(f"{test_perplexity(model, data):.2f}")
        rows.append(cells)
    print_table("layer_drop: code-llama-tiny", header, rows)
    return "**code-llama-tiny** (4 blocks), test perplexity on 128 held-out windows\n\n" + markdown_table(header, rows)


def sparse_size_section() -> str:
    built = load_builtin("minilm")
    header = ["pruning", "model.safetensors bytes", "× dense", "pruned layers × dense"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sl.save(built.model, Path(tmp) / "dense")
        dense = (Path(tmp) / "dense" / "model.safetensors").stat().st_size
        dense_sizes = safetensors_sizes(Path(tmp) / "dense" / "model.safetensors")
        rows.append(["dense", str(dense), "1", "1"])
        for label, spec in (("magnitude 50%", {"sparsity": 0.5}), ("magnitude 2:4", {"pattern": "2:4"})):
            result = sl.compress(built.model, {"steps": [{"method": "magnitude", **spec}]})
            sl.save(result.model, Path(tmp) / label)
            path = Path(tmp) / label / "model.safetensors"
            sizes = safetensors_sizes(path)
            layers = [m + ".weight" for m in result.steps[0].modules]
            pruned = sum(v for k, v in sizes.items() if any(k.startswith(w) for w in layers))
            rows.append([label, str(path.stat().st_size), f"{path.stat().st_size / dense:.3f}",
                         f"{pruned / sum(dense_sizes[w] for w in layers):.3f}"])
    print_table("sparse storage: minilm", header, rows)
    return "**minilm**, bitmask + values storage of `sl.save`\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    sections = [structured_section(args), layer_drop_section(args), sparse_size_section()]
    load = (f"Machine load (other engineers share the {os.cpu_count()} cores): 1-min load average "
            f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    print(load)
    parts = [conditions_line(args.threads), load, *sections]
    if not args.no_write:
        write_section("structured", "Structured pruning, layer dropping and sparse storage", "\n\n".join(parts))


if __name__ == "__main__":
    main()
