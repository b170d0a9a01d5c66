"""Recovery after compression: ``distill`` (and ``qat``) win back what pruning and quantization cost.

Every recovered row stands beside its unrecovered row, all in one process:

* **minilm**: structured 50% (``--sparsity``) heads + neurons, then ``distill`` (pooled-embedding cosine, plus
  TinyBERT hidden-state matching with ``--hidden-weight``); both again followed by
  ``int8_dynamic`` + ``compile`` (TorchInductor, with its default attention — slimline's
  kernel over each row's real keys for these encoders —, with the model's own ``sdpa`` and
  with ``attention: eager``; with ``--unpad`` also with the padding removed inside the encoder; with
  ``--onnxruntime`` also ONNX Runtime's integer GEMMs). Latency interleaved with fp32 on one test batch
  (MEASURING.md); quality is the mean cosine of mask-aware mean-pooled embeddings to fp32 on
  the held-out test sentences (``benchmarks.pruning.cosine_quality``, as the structured
  section computes it).
* **minilm**: gptq 3-bit g128, then ``distill`` — the packed layers stay frozen, so only the
  embeddings, LayerNorms and the float biases outside them train; with ``--qat``, ``qat``
  3-bit g128 (LSQ: weights and step sizes trained through the rounding) beside ``rtn`` 3-bit
  g128, the grid it starts from.
* **code-llama-tiny** (``--only code-llama``; needs the full model): ``layer_drop`` 1 block,
  then ``distill``; wanda 50% and 2:4, then ``distill trainable: lora``. Test perplexity, the
  share of the gap to dense that distillation closes, and whether every pruned weight is
  still exactly zero.

Distillation trains on the train split. Its settings were chosen on the validation split
(``--eval-split validation`` scores there and writes nothing), never on test.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import slimline as sl
from benchmarks.harness import (
    conditions_line,
    interleaved,
    isa_suffix,
    markdown_table,
    print_table,
    write_section,
)
from benchmarks.pruning import cosine_quality, test_perplexity
from slimline.core.batches import Batch, forward, output_tensor
from slimline.models import load_builtin

STRUCTURED = {"method": "structured", "sparsity": 0.5, "units": ["heads", "neurons"]}
GPTQ3 = {"method": "gptq", "bits": 3, "group_size": 128}
RTN3 = {"method": "rtn", "bits": 3, "group_size": 128}
FAST = [{"method": "int8_dynamic"}, {"method": "compile"}]
# the model's own attention (torch's fused SDPA with the padding mask): compile's default before
# its attention: auto picked slimline's kernel for encoders
FAST_SDPA = [{"method": "int8_dynamic"}, {"method": "compile", "attention": "model"}]
# transformers' matmul + softmax attention, fused by inductor: faster at sentence lengths
FAST_EAGER = [{"method": "int8_dynamic"}, {"method": "compile", "attention": "eager"}]
FAST_ORT = [{"method": "int8_dynamic"}, {"method": "compile", "backend": "onnxruntime"}]  # integer GEMMs
FAST_UNPAD = [{"method": "int8_dynamic"}, {"method": "unpad"}, {"method": "compile"}]  # real tokens only
HALF = [{"method": "half"}, {"method": "compile"}]  # bf16: the fast path where the CPU has AMX
LOSSLESS_RECIPE = (Path(__file__).resolve().parents[1] / "recipes"
                   / "encoder-cpu-lossless-openvino.yaml")
FAST_RECIPE = LOSSLESS_RECIPE.with_name("encoder-cpu-fast.yaml")
SECTION = "recovery"
TITLE = "Recovery: distill (and qat) after pruning and quantization"


@dataclass
class Row:
    """One variant: its model (None once scored and not timed), quality, distill seconds."""

    name: str
    recipe: str
    model: nn.Module | None
    quality: float | None = None
    train_s: float | None = None
    timed: bool = False
    note: str = ""


def describe(steps: list[dict[str, Any]]) -> str:
    """A recipe in one cell: ``method(k=v, ...)`` joined by ``→``."""
    parts = []
    for s in steps:
        fields = ", ".join(f"{k}={v}" for k, v in s.items() if k != "method")
        parts.append(f"{s['method']}({fields})" if fields else s["method"])
    return " → ".join(parts)


def distill_step(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The distill step of every minilm row: one pass over ``args.steps`` train batches."""
    step = {"method": "distill", "steps": args.steps, "lr": args.lr, "warmup": max(args.steps // 10, 1),
            "hidden_weight": args.hidden_weight}
    if args.autocast:
        step["autocast"] = True
    if args.group_by_length:
        step["group_by_length"] = True
    if args.teacher_cache_mb != 256:
        step["teacher_cache_mb"] = args.teacher_cache_mb
    if args.freeze_word_embeddings:  # 11.7M of minilm's 22.7M parameters, unchanged by pruning
        step["targets"] = {"exclude": ["embeddings.word_embeddings"]}
    return {**step, **extra}


def step_seconds(result: Any, method: str) -> float:
    return sum(r.seconds for r in result.steps if r.method == method)


# --- minilm ------------------------------------------------------------------------------------


class MinilmRun:
    """The minilm rows: built one by one, published as each completes, timed at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.built = load_builtin("minilm")
        self.base = self.built.model
        self.data: list[Any] = self.built.batches(args.eval_split, batch_size=32)
        with torch.inference_mode():
            self.reference = [output_tensor(forward(self.base, b), b).float() for b in self.data]
        # Each train batch is visited once (one pass over steps × batch_size sentences).
        self.train = self.built.batches("train", batch_size=args.batch_size, limit=args.steps)
        self.rows: list[Row] = [Row("fp32", "-", self.base, 1.0, timed=True)]
        self.timings: dict[str, float] = {}
        self.started = time.strftime("%Y-%m-%d %H:%M")
        self.load_start = os.getloadavg()[0]

    def add(self, name: str, steps: list[dict[str, Any]], *, calibration: list[Batch] | None = None,
            start: nn.Module | None = None, timed: bool = False, note: str = "") -> nn.Module:
        """Compress (``start`` or fp32) with ``steps``, score it, publish the table so far."""
        begin = time.perf_counter()
        result = sl.compress(start if start is not None else self.base, {"steps": steps},
                             calibration=calibration, training=self.train, progress=self.args.progress)
        trained = step_seconds(result, "distill") + step_seconds(result, "qat")
        notes = [n for r in result.steps if r.method in ("distill", "qat") for n in r.notes]
        quality = cosine_quality(result.model, self.reference, self.data)  # compiles on every shape
        row = Row(name, describe(steps), result.model, quality, trained or None, timed,
                  "; ".join(filter(None, [note, *notes])))
        self.rows.append(row)
        print(f"{name}: cosine {quality:.4f} ({time.perf_counter() - begin:.0f} s)", flush=True)
        if not row.timed:
            row.model = None
        self.publish()
        return result.model

    def time_rows(self) -> None:
        batch = self.data[0]
        if not isinstance(batch, Mapping):
            raise TypeError("minilm batches are dicts")

        def call(model: nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return forward(model, batch)

            return run

        live = {r.name: call(r.model) for r in self.rows if r.timed and r.model is not None}
        times = interleaved(live, runs=self.args.runs, warmup=self.args.warmup)
        self.timings = {n: t.median_ms for n, t in times.items()}
        self.publish()

    def table(self) -> tuple[list[str], list[list[Any]]]:
        header = ["variant", "recipe", "latency ms", "speed-up × fp32", f"cosine to fp32 ({self.args.eval_split})",
                  "distill / qat s", "note"]
        fp32 = self.timings.get("fp32")
        rows = []
        for r in self.rows:
            t = self.timings.get(r.name)
            latency = f"{t:.1f}" if t else ("pending" if r.timed else "not timed")
            speed = f"{fp32 / t:.2f}" if t and fp32 else "-"
            rows.append([r.name, f"`{r.recipe}`", latency, speed, f"{r.quality:.4f}" if r.quality else "-",
                         f"{r.train_s:.0f}" if r.train_s else "-", r.note])
        return header, rows

    def body(self) -> str:
        a = self.args
        header, rows = self.table()
        seq = self.data[0]["input_ids"].shape[1]
        sentences = sum(int(b["input_ids"].shape[0]) for b in self.data)
        cond = conditions_line(a.threads, timing_batch=f"32 × {seq} tokens", runs=a.runs, warmup=a.warmup,
                               cosine_sentences=f"{sentences} ({a.eval_split} split)")
        load = (f"Run started {self.started}; machine shared with other engineers' jobs ({os.cpu_count()} cores): "
                f"1-min load average {self.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} now.")
        passes = a.steps / len(self.train)
        visits = "one pass" if passes == 1 else f"{passes:.1f} passes (reshuffled each)"
        train = (f"Distillation: `{describe([distill_step(a)])}`, AdamW, warm-up then cosine to 0, {visits} "
                 f"over {len(self.train)} train batches of {a.batch_size} sentences, teacher = the fp32 model "
                 "before the recipe, loss = 1 − cosine of the mean-pooled embeddings"
                 + (f" + {a.hidden_weight} × TinyBERT hidden-state loss (every layer, relative squared error)"
                    if a.hidden_weight else "") + "; wall time of the training step alone.")
        calib = ("" if a.skip_structured else f" `structured` calibrates on {a.calib_batches} batches of 8 "
                 "train sentences (its least-squares repair and unit ranking).")
        return "\n\n".join([cond, load, train + calib, markdown_table(header, rows)])

    def publish(self) -> None:
        header, rows = self.table()
        print_table("recovery: minilm", header, rows)
        if not self.args.no_write and self.args.eval_split == "test":
            kind = isa_suffix()  # a section per kind of CPU
            # Without the structured or the gptq rows, a section of its own: the full one stays.
            part = "-gptq" if self.args.skip_structured else "-structured" if self.args.skip_quant else ""
            autocast = "-autocast" if self.args.autocast else ""  # beside the float32 training's
            suffix = self.args.section_suffix
            write_section(f"{SECTION}-minilm{part}{autocast}{suffix}{kind}", f"{TITLE}: minilm"
                          + (f", {part[1:]} rows" if part else "")
                          + (", distilled in bf16 autocast" if autocast else "")
                          + (f", {self.args.steps} distill steps" if suffix else "")
                          + (f" ({kind[1:].upper()} CPU)" if kind else ""), self.body())


def minilm(args: argparse.Namespace) -> None:
    run = MinilmRun(args)
    if not args.skip_structured:
        minilm_structured(run)
    if not args.skip_quant:
        gcalib = run.built.batches("train", batch_size=8, limit=16)  # as the weight-quant section
        run.add("gptq int3 g128", [GPTQ3], calibration=gcalib)
        if "frozen" in args.quant_rows:
            run.add("gptq int3 g128 + distill", [GPTQ3, distill_step(args)], calibration=gcalib,
                    note="packed layers frozen")
        if "train" in args.quant_rows:
            step = distill_step(args, quantized="train", scale_lr=args.scale_lr)
            run.add("gptq int3 g128 + distill (quantized: train)", [GPTQ3, step], calibration=gcalib,
                    note="packed layers trained through their grid (LSQ from GPTQ's codes)")
    if args.qat:
        run.add("rtn int3 g128", [RTN3], note="the grid qat starts from")
        qat = {"method": "qat", "bits": 3, "group_size": 128, "steps": args.steps, "lr": args.lr,
               "scale_lr": args.lr}
        run.add("qat int3 g128", [qat], note="LSQ; distills from fp32 (relative squared error of the states)")
    run.time_rows()


def minilm_structured(run: MinilmRun) -> None:
    """structured heads + neurons, then distill, then int8_dynamic + compile on each."""
    args = run.args
    pct = f"structured {args.sparsity:.0%}"
    calib = run.built.batches("train", batch_size=8, limit=args.calib_batches)
    structured = {**STRUCTURED, "sparsity": args.sparsity, "importance": args.importance}
    pruned = run.add(pct, [structured], calibration=calib, timed=True)
    recovered = run.add(f"{pct} + distill", [structured, distill_step(args)], calibration=calib,
                        timed=True)
    fast_note = "int8_dynamic + compile (default attention: slimline kernel) applied to the row above"
    run.add("fp32 + int8_dynamic + compile", FAST, timed=True, note="the int8 gain alone")
    run.add(f"{pct} + int8_dynamic + compile", FAST, start=pruned, timed=True,
            note=f"int8_dynamic + compile applied to the {pct} row")
    run.add(f"{pct} + distill + int8_dynamic + compile", FAST, start=recovered, timed=True,
            note=fast_note)
    run.add(f"{pct} + distill + half + compile", HALF, start=recovered, timed=True,
            note="half (bf16) + compile applied to the distilled row, beside the int8 one")
    sdpa_note = "compile with attention: model (the model's own sdpa attention, padding masked)"
    run.add(f"{pct} + distill + int8_dynamic + compile, sdpa attention", FAST_SDPA, start=recovered,
            timed=True, note=f"{sdpa_note}, applied to the distilled row")
    eager_note = "compile with attention: eager (matmul + softmax fused by inductor; slower on long inputs)"
    run.add("fp32 + int8_dynamic + compile, eager attention", FAST_EAGER, timed=True, note=eager_note)
    run.add(f"{pct} + distill + int8_dynamic + compile, eager attention", FAST_EAGER, start=recovered,
            timed=True, note=f"{eager_note}, applied to the distilled row")
    if args.unpad:  # the padded positions of the timing batch skipped inside the encoder
        unpad_note = "int8_dynamic + unpad + compile (layers run on the batch's real tokens only)"
        run.add("fp32 + int8_dynamic + unpad + compile", FAST_UNPAD, timed=True, note=unpad_note)
        run.add(f"{pct} + distill + int8_dynamic + unpad + compile", FAST_UNPAD, start=recovered,
                timed=True, note=f"{unpad_note}, applied to the distilled row")
    if args.onnxruntime:  # the W8A8 layers as ONNX MatMulInteger (VNNI where the CPU has it)
        run.add("fp32 + int8_dynamic + compile onnxruntime", FAST_ORT, timed=True,
                note="the int8 gain alone, on ONNX Runtime's integer GEMMs")
        run.add(f"{pct} + distill + int8_dynamic + compile onnxruntime", FAST_ORT, start=recovered,
                timed=True, note="int8_dynamic + compile backend onnxruntime applied to the distilled row")
    if args.openvino:  # the named recipe's own steps, as its file states them
        lossless = yaml.safe_load(LOSSLESS_RECIPE.read_text())["steps"]
        run.add(f"{pct} + distill + compile openvino bf16", lossless, start=recovered,
                timed=True, note="recipes/encoder-cpu-lossless-openvino.yaml applied to the distilled row")
    if args.fast_recipe:  # recipes/encoder-cpu-fast.yaml's steps, with the model's and with eager attention
        fast = yaml.safe_load(FAST_RECIPE.read_text())["steps"]
        eager = [{**s, "attention": "eager"} if s["method"] == "compile" else s for s in fast]
        run.add("fp32 + encoder-cpu-fast", fast, calibration=calib, timed=True,
                note="recipes/encoder-cpu-fast.yaml on the dense model")
        run.add(f"{pct} + distill + encoder-cpu-fast", fast, start=recovered, calibration=calib, timed=True,
                note="recipes/encoder-cpu-fast.yaml applied to the distilled row")
        run.add(f"{pct} + distill + encoder-cpu-fast, eager attention", eager, start=recovered,
                calibration=calib, timed=True, note=f"{eager_note}, applied to the distilled row")


# --- code-llama-tiny ---------------------------------------------------------------------------


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The zero pattern of every Linear weight that has zeros."""
    return {n: m.weight.detach() == 0 for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and bool((m.weight == 0).any())}


def sparsity_kept(before: dict[str, torch.Tensor], model: nn.Module) -> str:
    """``yes`` when every weight zero before training is still exactly zero, else the count."""
    weights = dict(model.named_modules())
    lost = sum(int((mask & (weights[n].weight.detach() != 0)).sum()) for n, mask in before.items())
    zeros = sum(int(m.sum()) for m in before.values())
    return f"yes ({zeros:,} zeros kept)" if lost == 0 else f"NO: {lost:,} of {zeros:,} zeros lost"


def code_llama(args: argparse.Namespace) -> str:
    built = load_builtin("code-llama-tiny", size=args.lm_size)
    calib = built.batches("train", batch_size=8, limit=8)
    train = built.batches("train", batch_size=args.lm_batch_size, limit=args.lm_steps)
    data: list[Any] = built.batches(args.eval_split, batch_size=16, limit=8)
    dense = test_perplexity(built.model, data)
    distill = {"method": "distill", "steps": args.lm_steps, "lr": args.lm_lr, "warmup": max(args.lm_steps // 10, 1)}
    lora = {**distill, "trainable": "lora", "lr": args.lm_lora_lr}
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("layer_drop 1 block", {"method": "layer_drop", "n_layers": 1}, distill),
        ("wanda 50%", {"method": "wanda", "sparsity": 0.5}, lora),
        ("wanda 2:4", {"method": "wanda", "pattern": "2:4"}, lora),
    ]
    header = ["variant", "recipe", f"{args.eval_split} perplexity", "gap to dense closed", "distill s",
              "pruned weights still zero", "note"]
    rows: list[list[Any]] = [["dense", "-", f"{dense:.2f}", "-", "-", "-", ""]]
    for name, step, recover in cases:
        pruned = sl.compress(built.model, {"steps": [step]}, calibration=calib).model
        before = test_perplexity(pruned, data)
        masks = zero_masks(pruned)
        rows.append([name, f"`{describe([step])}`", f"{before:.2f}", "-", "-", "-", ""])
        result = sl.compress(built.model, {"steps": [step, recover]}, calibration=calib, training=train,
                             progress=args.progress)
        after = test_perplexity(result.model, data)
        closed = (before - after) / (before - dense) if before != dense else float("nan")
        kept = sparsity_kept(masks, result.model) if masks else "-"
        notes = [n for r in result.steps if r.method == "distill" for n in r.notes]
        rows.append([f"{name} + distill", f"`{describe([step, recover])}`", f"{after:.2f}", f"{closed:.0%}",
                     f"{step_seconds(result, 'distill'):.0f}", kept, "; ".join(notes)])
        print_table("recovery: code-llama-tiny", header, rows)
    windows = sum(int(b["input_ids"].shape[0]) for b in data)
    seq = data[0]["input_ids"].shape[1]
    return (conditions_line(args.threads, model_size=args.lm_size) + "\n\n"
            f"**code-llama-tiny** ({args.lm_size}), {args.eval_split} perplexity on {windows} windows of {seq} "
            f"tokens; distillation on {len(train)} train batches of {args.lm_batch_size} windows (one pass), "
            "logit KL at T = 1 against the model before the recipe; LoRA adapters merged after training "
            "(the base's zeros rewritten).\n\n" + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["all", "minilm", "code-llama"], default="minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-split", choices=["test", "validation"], default="test",
                        help="validation: for choosing settings; nothing is written")
    parser.add_argument("--steps", type=int, default=200, help="minilm distill steps (one batch each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--calib-batches", type=int, default=128,
                        help="structured: calibration batches of 8 train sentences")
    parser.add_argument("--importance", choices=["activation", "obs", "magnitude"], default="obs",
                        help="structured's unit ranking")
    parser.add_argument("--skip-quant", action="store_true", help="no gptq rows")
    parser.add_argument("--skip-structured", action="store_true", help="no structured rows")
    parser.add_argument("--quant-rows", default="frozen,train",
                        help="gptq + distill rows: frozen (packed layers kept), train (LSQ through their grid)")
    parser.add_argument("--scale-lr", type=float, default=1e-4, help="step-size lr of quantized: train")
    parser.add_argument("--autocast", action="store_true", help="minilm distill in bf16 autocast")
    parser.add_argument("--teacher-cache-mb", type=int, default=3072,
                        help="minilm distill: teacher outputs kept for the next epochs (3 GiB holds them all)")
    parser.add_argument("--freeze-word-embeddings", action="store_true",
                        help="minilm distill: the word-embedding matrix stays as it is")
    parser.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                        help="minilm distill on the built-in batches as padded (default: regrouped by length)")
    parser.add_argument("--qat", action="store_true", help="add the rtn / qat 3-bit rows")
    parser.add_argument("--openvino", action="store_true",
                        help="structured rows: the distilled model again under compile backend openvino bf16")
    parser.add_argument("--unpad", action="store_true",
                        help="structured rows: int8_dynamic + unpad + compile, on fp32 and distilled")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="structured rows: int8_dynamic + compile backend onnxruntime, on fp32 and distilled")
    parser.add_argument("--lm-size", choices=["full", "small"], default="full")
    parser.add_argument("--lm-steps", type=int, default=100)
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--lm-lr", type=float, default=1e-4)
    parser.add_argument("--lm-lora-lr", type=float, default=1e-3)
    parser.add_argument("--sparsity", type=float, default=0.5, help="minilm structured sparsity")
    parser.add_argument("--fast-recipe", action="store_true",
                        help="add recipes/encoder-cpu-fast.yaml rows (dense and on the distilled model)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--section-suffix", default="",
                        help="minilm: write a section of its own (e.g. =-short for another step count)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in ("all", "minilm"):
        minilm(args)
    if args.only in ("all", "code-llama"):
        body = code_llama(args)
        print(body)
        if not args.no_write and args.eval_split == "test" and args.lm_size == "full":
            write_section(f"{SECTION}-code-llama", f"{TITLE}: code-llama-tiny", body)


if __name__ == "__main__":
    main()
