"""Weight-only quantization on code-llama-tiny and minilm, slimline beside torchao and quanto.

Rows, all in one process: fp32; slimline `rtn`, `gptq`, `awq`, `hqq` at 4 and 3 bits, group
size 128 and per-channel (and, on minilm, asymmetric 3-bit g128 for rtn, gptq, awq); slimline
`rtn` int8 per-channel; torchao int8 and int4 weight-only; optimum-quanto int8 and int4
weights. Every row quantizes the same layers: slimline's default targets, every Linear-like
layer but the output head (the peers are given those names).

Columns:

- quality on held-out data: test perplexity (code-llama-tiny) or the mean cosine of pooled
  embeddings to fp32 (minilm, test-split sentences);
- quantization time (wall clock, including the copy of the model every method makes) and the
  process's peak resident memory while quantizing (VmHWM after a reset through
  /proc/self/clear_refs, ``slimline.evaluate.bench.peak_rss_during``), with its rise above the
  resident memory at the start (freed heap is handed back to the OS before each reading);
- latency: median of interleaved forwards of one test batch, every row's model alternating
  (``benchmarks.harness.interleaved``), eager mode;
- bytes: the quantized layers as stored (codes, scales, zero points, bias) against the same
  layers' fp32 bytes — for slimline, their tensors in the saved ``model.safetensors``; for the
  peers, their tensors in memory, tensor subclasses counted through their inner tensors — and
  the whole model: bytes in memory (``size_in_memory``) for every row, and for slimline the
  bytes of the directory ``sl.save`` writes, against fp32's.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import (
    conditions_line,
    interleaved,
    markdown_table,
    write_section,
)
from benchmarks.peers import PEERS, PeerBuilder, failure_note, peer_versions, settle_memory
from slimline.core.batches import forward, output_tensor
from slimline.core.modules import is_registered_module
from slimline.core.targets import Targets, select
from slimline.evaluate.bench import PeakMemory, current_rss, peak_rss_during
from slimline.evaluate.footprint import directory_bytes, size_in_memory
from slimline.evaluate.metrics import next_token_nll, perplexity
from slimline.models import load_builtin

MiB = 2**20
# Latency batch: minilm as in its other tables (32 sentences); code-llama-tiny one 256-token
# test sequence (a prompt's prefill).
TIMING_BATCH = {"minilm": 32, "code-llama-tiny": 1}
SLOW_FACTOR = 10  # rows slower than this × fp32 are timed apart (fewer runs), and say so


@dataclass(frozen=True)
class Variant:
    label: str
    steps: list[dict[str, Any]]
    bits: int
    group_size: int | None


def slimline_variants(model_name: str, quick: bool) -> list[Variant]:
    out = [Variant("rtn int8 per-channel", [{"method": "rtn", "bits": 8, "group_size": None}], 8, None)]
    grid = [(4, 128), (4, None), (3, 128), (3, None)]
    for method in ("rtn", "gptq", "awq", "hqq"):
        for bits, group in grid:
            where = "g128" if group else "per-channel"
            out.append(Variant(f"{method} int{bits} {where}",
                               [{"method": method, "bits": bits, "group_size": group}], bits, group))
    if model_name == "minilm":  # asymmetric 3-bit grids (hqq's default already)
        for method in ("rtn", "gptq", "awq"):
            out.append(Variant(f"{method} int3 g128 asym",
                               [{"method": method, "bits": 3, "group_size": 128, "symmetric": False}],
                               3, 128))
    if quick:  # one configuration per method, every code path of the script
        keep = {"rtn int8 per-channel", "rtn int4 g128", "gptq int4 per-channel", "awq int3 g128",
                "hqq int3 per-channel", "rtn int3 g128 asym"}
        out = [v for v in out if v.label in keep]
    return out


# Size bounds from the issue, on the quantized layers' stored bytes against fp32.
BOUNDS: list[tuple[str, Callable[[Variant], bool], float]] = [
    ("4-bit g128", lambda v: v.bits == 4 and v.group_size == 128, 0.16),
    ("3-bit (packed)", lambda v: v.bits == 3, 0.13),
    ("8-bit", lambda v: v.bits == 8, 0.28),
]


@dataclass
class Row:
    label: str
    library: str
    model: nn.Module | None = None
    variant: Variant | None = None
    quality: float | None = None
    seconds: float | None = None
    peak: PeakMemory | None = None
    rss_start: int = 0
    layers_ratio: float | None = None
    model_mem_ratio: float | None = None
    model_saved_ratio: float | None = None
    mode: GradMode = torch.inference_mode
    notes: list[str] = field(default_factory=list)

    def evaluate(self, quality: Callable[[nn.Module, GradMode], float]) -> None:
        """Quality under torch.inference_mode; a model that cannot run there (a peer's tensor
        subclass) is measured under torch.no_grad, and its row says so."""
        assert self.model is not None
        try:
            self.quality = quality(self.model, torch.inference_mode)
        except RuntimeError as exc:
            self.notes.append(INFERENCE_MODE_NOTE.format(failure_note(exc).removeprefix("failed: ")))
            self.mode = torch.no_grad
            self.quality = quality(self.model, torch.no_grad)


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its JSON header."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def fp32_bytes(reference: nn.Module, names: list[str]) -> int:
    return sum(p.numel() * 4 for n in names for p in reference.get_submodule(n).parameters())


GradMode = Callable[[], AbstractContextManager[Any]]
INFERENCE_MODE_NOTE = "fails under torch.inference_mode ({}); quality and latency under torch.no_grad"


def embedding_cosine(model: nn.Module, reference: list[torch.Tensor], data: list[Any]) -> float:
    """Mean cosine of ``model``'s pooled embeddings to ``reference``, item by item."""
    cos = [torch.nn.functional.cosine_similarity(output_tensor(forward(model, b), b).float(), r, dim=-1)
           for b, r in zip(data, reference, strict=True)]
    return float(torch.cat(cos).mean())


def held_out_perplexity(model: nn.Module, data: list[Any]) -> float:
    nll, tokens = 0.0, 0
    for b in data:
        logits = output_tensor(forward(model, b), b).float()
        s, n = next_token_nll(logits, b["input_ids"], b.get("attention_mask"))
        nll, tokens = nll + float(s), tokens + int(n)
    return perplexity(nll, tokens)


def measured(work: Callable[[], tuple[nn.Module, str]]) -> tuple[nn.Module, str, float, PeakMemory, int]:
    """Run ``work`` once: its result, wall seconds, peak RSS and the RSS at its start."""
    settle_memory()
    start_rss = current_rss()
    box: dict[str, Any] = {}

    def run() -> None:
        start = time.perf_counter()
        box["result"] = work()
        box["seconds"] = time.perf_counter() - start

    peak = peak_rss_during(run)
    model, note = box["result"]
    return model, note, box["seconds"], peak, start_rss


def run_model(name: str, args: argparse.Namespace) -> tuple[str, list[str], list[list[Any]], str]:
    built = load_builtin(name)
    base = built.model.eval()
    calib = built.batches("train", batch_size=8, limit=args.calib_batches)
    data: list[Any] = built.batches("test", batch_size=16, limit=args.eval_batches)
    embedding = built.task == "embedding"
    with torch.inference_mode():
        reference = [output_tensor(forward(base, b), b).float() for b in data] if embedding else []
    metric = "cosine to fp32" if embedding else "test perplexity"

    def quality(m: nn.Module, mode: GradMode = torch.inference_mode) -> float:
        with mode():
            if embedding:
                return embedding_cosine(m, reference, data)
            return held_out_perplexity(m, data)

    targets = [n for n, _ in select(base, Targets())]
    target_fp32 = fp32_bytes(base, targets)
    base_mem = size_in_memory(base)
    with tempfile.TemporaryDirectory() as tmp:
        sl.save(base, Path(tmp) / "m")
        base_saved = directory_bytes(Path(tmp) / "m")
    rows = [Row("fp32", "-", base, quality=quality(base), layers_ratio=1.0, model_mem_ratio=1.0,
                model_saved_ratio=1.0)]

    for variant in slimline_variants(name, args.quick):
        row = Row(variant.label, "slimline", variant=variant)

        def compress(steps: list[dict[str, Any]] = variant.steps) -> tuple[nn.Module, str]:
            return sl.compress(base, {"steps": steps}, calibration=calib).model, ""

        try:
            row.model, _, row.seconds, row.peak, row.rss_start = measured(compress)
        except Exception as exc:  # reported in the table, as for the peers
            row.notes.append(failure_note(exc))
            rows.append(row)
            continue
        names = [n for n, m in row.model.named_modules() if n and is_registered_module(m)]
        if sorted(names) != sorted(targets):
            row.notes.append(f"{len(names)} of {len(targets)} target layers quantized")
        with tempfile.TemporaryDirectory() as tmp:
            sl.save(row.model, Path(tmp) / "m")
            sizes = safetensors_sizes(Path(tmp) / "m" / "model.safetensors")
            row.model_saved_ratio = directory_bytes(Path(tmp) / "m") / base_saved
        layers = sum(v for k, v in sizes.items() if any(k.startswith(n + ".") for n in names))
        row.layers_ratio = layers / fp32_bytes(base, names)
        row.model_mem_ratio = size_in_memory(row.model) / base_mem
        row.evaluate(quality)
        rows.append(row)
        print(f"[{name}] {variant.label}: {row.quality:.4f} in {row.seconds:.1f} s", flush=True)

    for peer in PEERS:
        row = Row(peer.label, "peer")

        def quantize_peer(build: PeerBuilder = peer.build) -> tuple[nn.Module, str]:
            return build(base, targets)

        try:
            row.model, note, row.seconds, row.peak, row.rss_start = measured(quantize_peer)
            row.notes.append(note)
            row.layers_ratio = sum(size_in_memory(row.model.get_submodule(n)) for n in targets) / target_fp32
            row.model_mem_ratio = size_in_memory(row.model) / base_mem
            row.evaluate(quality)
        except Exception as exc:  # a peer's failure is reported in the table, not hidden
            row.model = None
            row.notes.append(failure_note(exc))
        rows.append(row)
        print(f"[{name}] {peer.label}: {row.quality} {'; '.join(row.notes)}", flush=True)

    timing_batch: Any = built.batches("test", batch_size=TIMING_BATCH.get(name, 16), limit=1)[0]

    def call(model: nn.Module, mode: GradMode) -> Callable[[], object]:
        def run() -> object:
            with mode():
                return forward(model, timing_batch)

        return run

    live = {r.label: call(r.model, r.mode) for r in rows if r.model is not None}
    # A row whose forward is many times fp32's (torchao's CPU int4 kernel on float32
    # activations) would set the pace of every round; the median of three interleaved probe
    # calls (the quality pass warmed every model) sorts those into a second, shorter
    # interleaved loop against fp32.
    probe = interleaved(live, runs=3, warmup=0)
    slow = [n for n, t in probe.items() if t.median_ms > SLOW_FACTOR * probe["fp32"].median_ms]
    timings = interleaved({n: c for n, c in live.items() if n not in slow},
                          runs=args.runs, warmup=args.warmup)
    ratios = {n: t.median_ms / timings["fp32"].median_ms for n, t in timings.items()}
    slow_runs = max(3, args.runs // 3)
    if slow:
        apart = interleaved({n: live[n] for n in ["fp32", *slow]}, runs=slow_runs, warmup=1)
        for n in slow:
            timings[n] = apart[n]
            ratios[n] = apart[n].median_ms / apart["fp32"].median_ms
            next(r for r in rows if r.label == n).notes.append(
                f"latency from a separate loop with fp32 ({slow_runs} runs): over {SLOW_FACTOR}× fp32")

    header = ["variant", "library", metric, "vs fp32", "quantize s", "quantize peak RSS MiB (rise)",
              "latency ms", "× fp32", "layers × fp32", "model mem × fp32", "model saved × fp32", "note"]
    base_q = rows[0].quality
    assert base_q is not None
    table: list[list[Any]] = []
    for r in rows:
        t = timings.get(r.label)
        table.append([
            r.label, r.library,
            "-" if r.quality is None else f"{r.quality:.4f}",
            "-" if r.quality is None or r is rows[0] else f"{(r.quality / base_q - 1) * 100:+.2f}%",
            "-" if r.seconds is None else f"{r.seconds:.1f}",
            "-" if r.peak is None else f"{r.peak.bytes / MiB:.0f} (+{(r.peak.bytes - r.rss_start) / MiB:.0f})",
            "-" if t is None else f"{t.median_ms:.1f}",
            "-" if t is None else f"{ratios[r.label]:.2f}",
            "-" if r.layers_ratio is None else f"{r.layers_ratio:.3f}",
            "-" if r.model_mem_ratio is None else f"{r.model_mem_ratio:.3f}",
            "-" if r.model_saved_ratio is None else f"{r.model_saved_ratio:.3f}",
            "; ".join(n for n in r.notes if n),
        ])
    checks = []
    for what, matches, bound in BOUNDS:
        stored = [r.layers_ratio for r in rows if r.variant and matches(r.variant) and r.layers_ratio]
        if stored:
            verdict = "met" if max(stored) <= bound else "NOT met"
            checks.append(f"{what} ≤ {bound}×: largest {max(stored):.3f}× ({verdict})")
    whole = sorted({f"{r.model_saved_ratio:.3f}" for r in rows if r.library == "slimline" and r.model_saved_ratio})
    method = next((r.peak.method for r in rows if r.peak is not None), "not measured")
    seq = timing_batch["input_ids"].shape[1]
    lines = [
        f"**{name}** — {len(targets)} quantized layers ({target_fp32 / MiB:.2f} MiB in fp32; the model "
        f"{base_mem / MiB:.2f} MiB in memory, {base_saved / MiB:.2f} MiB saved); calibration "
        f"{len(calib)}×8 train items; quality on {sum(b['input_ids'].shape[0] for b in data)} test "
        f"items; latency: batch {timing_batch['input_ids'].shape[0]}×{seq} tokens, median of "
        f"{args.runs} interleaved runs after {args.warmup} warm-up rounds; peak memory: {method}.",
        "Stored size of the quantized layers against fp32 (slimline rows): " + "; ".join(checks)
        + f". Whole model saved × fp32 over those rows: {', '.join(whole)} (embeddings"
        + (" and the output head" if built.task != "embedding" else "") + " stay fp32).",
    ]
    return metric, header, table, "\n\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="code-llama-tiny,minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibrated", action="store_true",
                        help="accepted for old command lines; gptq/awq/hqq rows always run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: one row per method, few batches, nothing written")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.calib_batches, args.eval_batches, args.runs, args.warmup = 2, 2, 3, 1
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = [conditions_line(args.threads, peers=peer_versions(), mode="eager (no torch.compile)")]
    for name in args.models.split(","):
        _, header, table, notes = run_model(name, args)
        print(f"weight quantization: {name}\n\n{notes}\n\n{markdown_table(header, table)}")
        parts += [notes, markdown_table(header, table)]
    print(f"total {time.perf_counter() - start:.0f} s")
    if not (args.no_write or args.quick):
        write_section("weight-quant", "Weight-only quantization: slimline, torchao and optimum-quanto",
                      "\n\n".join(parts))


if __name__ == "__main__":
    main()
