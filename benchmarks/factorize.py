"""Low-rank factorization: quality, parameters, factorization time and latency against dense.

Rows, each section measured in one process with every variant interleaved with the dense
model (MEASURING.md):

* ``minilm`` at 80% and 60% of the target layers' weights: ``svd``, ``asvd``, ``svd_llm``,
  uniform and allocated (``allocation: sensitivity``) ranks; mean cosine of the pooled
  sentence embeddings to fp32 on held-out (test split) sentences, latency × fp32, parameters,
  factorization seconds.
* ``digits-cnn``: ``tucker`` at 50% of the conv weights against dense and against
  ``structured`` channel pruning at the same conv weights and at the same model parameters;
  test accuracy and latency.
* ``code-llama-tiny`` (``--llm``, only when the model is already cached — this script never
  builds it): the minilm rows with test perplexity, and prefill and decode latency; then, per
  ratio, the best factorized row + ``distill`` (logit KL at T = 1 against the dense model, one
  pass over train windows) beside the same row unrecovered: how much recovery wins back.
  ``--llm-size small`` smoke-tests the code path on the small variant (no figure written).

Calibration comes from the train split, quality from the test split (split by module file).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
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
from benchmarks.recovery import describe, step_seconds
from slimline.core.batches import forward, output_tensor
from slimline.factorize.svd import SvdConfig
from slimline.models import load_builtin

RATIOS = (0.8, 0.6)
METHODS = ("svd", "asvd", "svd_llm")
ALLOCATIONS = ("uniform", "sensitivity")
# A digits-cnn forward takes milliseconds: on shared cores one preemption moves a short
# series' median, so it gets this many times the runs of the other models (seconds in all).
CNN_RUNS = 10
TITLES = {"minilm": "Low-rank factorization: minilm (svd, asvd, svd_llm)",
          "digits-cnn": "Low-rank factorization: digits-cnn (tucker against structured channels)",
          "code-llama-tiny": "Low-rank factorization: code-llama-tiny (svd, asvd, svd_llm)"}


def dict_batches(batches: list[Any]) -> list[dict[str, torch.Tensor]]:
    """The built-in text models' batches, which are dicts of tensors (HF style)."""
    if not all(isinstance(b, Mapping) for b in batches):
        raise TypeError("expected dict batches (input_ids, attention_mask, ...)")
    return [dict(b) for b in batches]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def target_weights(model: nn.Module, names: list[str]) -> int:
    """Weights (2-D parameters) under the target layers' names: dense or factorized."""
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters() if p.dim() == 2)


def calls_of(models: Mapping[str, nn.Module], run: Callable[[nn.Module], object]) -> dict[str, Callable[[], object]]:
    def bind(model: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return run(model)

        return call

    return {name: bind(m) for name, m in models.items()}


def factorized_variants(
    base: nn.Module, calib: list[Any], rows: list[dict[str, Any]]
) -> dict[str, nn.Module]:
    """Every method × ratio × allocation, compressed from ``base``; fills ``rows`` (one per model)."""
    names = [n for n, _ in SvdConfig().select_modules(base)]
    dense_targets = target_weights(base, names)
    # Untimed: the first compress pays one-time costs (imports, LAPACK set-up) that are
    # no method's own.
    sl.compress(base, {"steps": [{"method": "svd", "ratio": RATIOS[-1]}]})
    models: dict[str, nn.Module] = {"dense": base}
    rows.append({"label": "dense", "method": "-", "ranks": "-", "ratio": "-", "kept": 1.0,
                 "params": params(base), "seconds": None})
    for ratio in RATIOS:
        for method in METHODS:
            for allocation in ALLOCATIONS:
                label = f"{method} {allocation} {ratio:.0%}"
                step = {"method": method, "ratio": ratio, "allocation": allocation}
                start = time.perf_counter()
                out = sl.compress(base, {"steps": [step]}, calibration=calib).model
                seconds = time.perf_counter() - start
                models[label] = out
                rows.append({"label": label, "method": method, "ranks": allocation,
                             "ratio": f"{ratio:.0%}", "kept": target_weights(out, names) / dense_targets,
                             "params": params(out), "seconds": seconds})
                print(f"{label}: {seconds:.1f} s", flush=True)
    return models


def order_note(rows: list[dict[str, Any]], error: str, lower_is_better: bool) -> str:
    """Whether the expected order svd_llm ≤ asvd ≤ svd (in error) holds, per ratio × allocation."""
    out = []
    for ratio in RATIOS:
        for allocation in ALLOCATIONS:
            q = {r["method"]: r["quality"] for r in rows
                 if r["ratio"] == f"{ratio:.0%}" and r["ranks"] == allocation}
            err = {m: (v if lower_is_better else -v) for m, v in q.items()}
            holds = err["svd_llm"] <= err["asvd"] <= err["svd"]
            ranked = " ≤ ".join(sorted(err, key=err.__getitem__))
            out.append(f"{ratio:.0%} {allocation}: {ranked} ({'as expected' if holds else 'NOT the expected order'})")
    return f"Order in {error}: " + "; ".join(out) + "."


def factor_table(rows: list[dict[str, Any]], metric: str, timing_cols: list[str],
                 timings: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    header = ["variant", "ranks", "target weights kept", "params", metric, "factorize s", *timing_cols]
    dense = rows[0]["params"]
    table = []
    for r in rows:
        cells = [r["label"], r["ranks"], f"{r['kept']:.3f}", f"{r['params'] / 1e6:.2f}M ({r['params'] / dense:.3f})",
                 f"{r['quality']:.4f}" if metric != "test ppl" else f"{r['quality']:.3f}",
                 "-" if r["seconds"] is None else f"{r['seconds']:.1f}"]
        for t in timings:
            lat = t[r["label"]]
            cells.append(f"{lat.median_ms:.1f} ({lat.median_ms / t['dense'].median_ms:.2f}×)")
        table.append(cells)
    return header, table


def minilm_section(args: argparse.Namespace) -> str:
    built = load_builtin("minilm")
    calib = dict_batches(built.batches("train", batch_size=8, limit=args.calib_batches))
    data = dict_batches(built.batches("test", batch_size=32, limit=args.test_batches))
    reference = [output_tensor(forward(built.model, b), b).float() for b in data]
    rows: list[dict[str, Any]] = []
    models = factorized_variants(built.model, calib, rows)
    for r in rows:
        r["quality"] = cosine_quality(models[r["label"]], reference, data)
    batch = data[0]
    times = interleaved(calls_of(models, lambda m: forward(m, batch)), runs=args.runs, warmup=args.warmup)
    header, table = factor_table(rows, "cosine to fp32", ["latency ms (× fp32)"], [times])
    print_table("factorize: minilm", header, table)
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    seq = batch["input_ids"].shape[1]
    return (f"**minilm** — {len(SvdConfig().select_modules(built.model))} target Linear layers (every "
            f"Linear but the output head); calibration {args.calib_batches}×8 train sentences ({tokens} "
            f"tokens); cosine of mean-pooled embeddings to fp32 on {sum(b['input_ids'].shape[0] for b in data)} "
            f"test sentences; latency: batch {batch['input_ids'].shape[0]}×{seq} tokens, median of "
            f"{args.runs} interleaved runs (all rows in one loop) after {args.warmup} warm-up rounds. "
            "`ratio` is the share of the target layers' weights kept; allocated rows spend the same "
            "budget, layer by layer.\n\n"
            + markdown_table(header, table) + "\n" + order_note(rows, "1 − cosine", lower_is_better=False))


# ---- code-llama-tiny -------------------------------------------------------------------------


def decode_call(model: nn.Module, prompt: torch.Tensor, steps: int) -> Callable[[], object]:
    """``steps`` greedy decode steps after a cached prompt; the cache is cropped back after."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
    cache = out.cache  # transformers ≥ 5.2x; the DynamicCache of the prompt
    first = out.logits[:, -1:].argmax(-1)

    def run() -> object:
        with torch.inference_mode():
            token = first
            for _ in range(steps):
                step = model(input_ids=token, cache=cache, use_cache=True)
                token = step.logits[:, -1:].argmax(-1)
            cache.crop(-steps)  # back to the prompt: every call decodes from the same state
        return token

    return run


def llm_section(args: argparse.Namespace) -> str:
    built = load_builtin("code-llama-tiny", size=args.llm_size)
    calib = dict_batches(built.batches("train", batch_size=8, limit=args.calib_batches))
    data = dict_batches(built.batches("test", batch_size=16, limit=args.test_batches))
    rows: list[dict[str, Any]] = []
    models = factorized_variants(built.model, calib, rows)
    for r in rows:
        r["quality"] = test_perplexity(models[r["label"]], data)
    prefill_batch = {k: v[:1] for k, v in data[0].items()}
    prompt = prefill_batch["input_ids"][:, : args.prompt_len]
    prefill = interleaved(calls_of(models, lambda m: forward(m, prefill_batch)), runs=args.runs,
                          warmup=args.warmup)
    decode = interleaved({n: decode_call(m, prompt, args.decode_steps) for n, m in models.items()},
                         runs=args.runs, warmup=args.warmup)
    header, table = factor_table(rows, "test ppl", ["prefill ms (× dense)",
                                                    f"decode ms / {args.decode_steps} tokens (× dense)"],
                                 [prefill, decode])
    print_table(f"factorize: code-llama-tiny ({args.llm_size})", header, table)
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    body = (f"**code-llama-tiny** ({args.llm_size}) — calibration {args.calib_batches}×8 train windows "
            f"({tokens} tokens); test perplexity on {sum(b['input_ids'].shape[0] for b in data)} held-out "
            f"windows; prefill: 1×{prefill_batch['input_ids'].shape[1]} tokens; decode: "
            f"{args.decode_steps} greedy tokens after a cached {prompt.shape[1]}-token prompt, batch 1; "
            f"medians of {args.runs} interleaved runs after {args.warmup} warm-up rounds.\n\n"
            + markdown_table(header, table) + "\n" + order_note(rows, "perplexity", lower_is_better=True))
    if args.distill_steps:
        models.clear()  # the recovery rows are scored one at a time
        body += "\n\n" + recovery_part(args, built, calib, data, rows)
    return body


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ratio, the factorized row of least error (lowest perplexity)."""
    return [min((r for r in rows if r["ratio"] == f"{ratio:.0%}"), key=lambda r: r["quality"])
            for ratio in RATIOS]


def recovery_part(args: argparse.Namespace, built: Any, calib: list[Any], data: list[Any],
                  rows: list[dict[str, Any]]) -> str:
    """The best factorized row of each ratio, then the same recipe + ``distill``."""
    train = dict_batches(built.batches("train", batch_size=args.distill_batch, limit=args.distill_steps))
    recover = {"method": "distill", "steps": args.distill_steps, "lr": args.distill_lr,
               "warmup": max(args.distill_steps // 10, 1)}
    dense = rows[0]["quality"]
    header = ["variant", "recipe", "test ppl", "gap to dense closed", "params", "factorize + distill s",
              "note"]
    table: list[list[Any]] = [["dense", "-", f"{dense:.3f}", "-", f"{rows[0]['params'] / 1e6:.2f}M", "-", ""]]
    for best in best_rows(rows):
        step = {"method": best["method"], "ratio": float(best["ratio"].rstrip("%")) / 100,
                "allocation": best["ranks"]}
        table.append([best["label"], f"`{describe([step])}`", f"{best['quality']:.3f}", "-",
                      f"{best['params'] / 1e6:.2f}M", f"{best['seconds']:.0f}", "not recovered"])
        result = sl.compress(built.model, {"steps": [step, recover]}, calibration=calib, training=train,
                             progress=args.progress)
        after = test_perplexity(result.model, data)
        gap = best["quality"] - dense
        closed = f"{(best['quality'] - after) / gap:.0%}" if gap > 0 else "no gap to close"
        notes = [n for r in result.steps if r.method == "distill" for n in r.notes]
        seconds = step_seconds(result, best["method"]) + step_seconds(result, "distill")
        table.append([f"{best['label']} + distill", f"`{describe([step, recover])}`", f"{after:.3f}",
                      closed, f"{params(result.model) / 1e6:.2f}M", f"{seconds:.0f}",
                      "; ".join(notes)])
        print_table("factorize + distill: code-llama-tiny", header, table)
        del result
    windows = sum(int(b["input_ids"].shape[0]) for b in train)
    return (f"**Recovery** — per ratio, the factorized row of lowest test perplexity above, then the "
            f"same recipe followed by `distill` ({args.distill_steps} AdamW steps, one pass over "
            f"{windows} train windows in batches of {args.distill_batch}, lr {args.distill_lr:g} with "
            f"{recover['warmup']} warm-up steps then a cosine to 0, logit KL at T = 1 against the dense "
            "model, every parameter trainable). Distillation changes weights, not shapes: the recovered "
            "rows have the parameters and the latency of the rows above them.\n\n"
            + markdown_table(header, table))


def llm_cached(size: str) -> bool:
    from slimline.models.cache import is_cached
    from slimline.models.code_llama import cache_key

    return is_cached(cache_key(size))  # type: ignore[arg-type]


# ---- digits-cnn ------------------------------------------------------------------------------


def conv_weights(model: nn.Module) -> int:
    """Weights of every Conv2d (a Tucker layer's three convs included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def structured_at(base: nn.Module, calib: list[Any], goal: int, measure: Callable[[nn.Module], int]
                  ) -> tuple[nn.Module, float]:
    """``structured`` channel pruning whose ``measure`` is nearest ``goal`` (sparsity by 1% steps)."""
    best: tuple[int, float, nn.Module] | None = None
    for pct in range(1, 96):
        step = {"method": "structured", "sparsity": pct / 100, "units": ["channels"]}
        model = sl.compress(base, {"steps": [step]}, calibration=calib).model
        gap = abs(measure(model) - goal)
        if best is None or gap < best[0]:
            best = (gap, pct / 100, model)
        if measure(model) < goal:
            break
    assert best is not None
    return best[2], best[1]


def cnn_section(args: argparse.Namespace) -> str:
    from slimline.models.digits_cnn import accuracy, digits_splits

    built = load_builtin("digits-cnn")
    base = built.model
    test = digits_splits()["test"]
    calib = built.batches("train", batch_size=64, limit=4)
    models: dict[str, nn.Module] = {"dense": base}
    seconds: dict[str, float] = {}
    recipes = {"tucker 50% (every k×k conv)": {"method": "tucker", "ratio": 0.5},
               "tucker 50% (conv2; conv1 dense)": {"method": "tucker", "ratio": 0.5,
                                                   "targets": {"include": ["conv2"]}},
               "tucker 50% allocated (every k×k conv)": {"method": "tucker", "ratio": 0.5,
                                                         "allocation": "sensitivity"},
               "tucker rank vbmf": {"method": "tucker", "rank": "vbmf"}}
    for label, step in recipes.items():
        start = time.perf_counter()
        models[label] = sl.compress(base, {"steps": [step]}, calibration=calib).model
        seconds[label] = time.perf_counter() - start
    tucker = models["tucker 50% (every k×k conv)"]
    for label, goal, measure in (("same conv weights", conv_weights(tucker), conv_weights),
                                 ("same params", params(tucker), params)):
        start = time.perf_counter()
        model, sparsity = structured_at(base, calib, goal, measure)
        name = f"structured channels {sparsity:.0%} ({label} as tucker 50%)"
        models[name] = model
        seconds[name] = time.perf_counter() - start
    images = test["pixel_values"][: args.cnn_batch]
    times = interleaved(calls_of(models, lambda m: m(images)), runs=args.runs * CNN_RUNS, warmup=args.warmup)
    header = ["variant", "test accuracy", "conv weights", "params", "latency ms (× dense)", "compress s"]
    rows = []
    for name, m in models.items():
        t = times[name].median_ms
        rows.append([name, f"{accuracy(m, test):.4f}", f"{conv_weights(m)} ({conv_weights(m) / conv_weights(base):.3f})",
                     f"{params(m)} ({params(m) / params(base):.3f})", f"{t:.3f} ({t / times['dense'].median_ms:.2f}×)",
                     "-" if name not in seconds else f"{seconds[name]:.2f}"])
    print_table("factorize: digits-cnn", header, rows)
    return (f"**digits-cnn** — test accuracy on {len(test['labels'])} held-out images; latency: batch "
            f"{images.shape[0]} images, median of {args.runs * CNN_RUNS} interleaved runs after {args.warmup} "
            "warm-up rounds. Structured rows: the channel sparsity (1% steps, calibration 4×64 train "
            "images, slimline's defaults) whose conv weights, or whole-model parameters, come nearest "
            "the every-conv Tucker row's; the 'compress s' of those rows includes that search.\n\n"
            + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", default="minilm,digits-cnn",
                        help="comma-separated: minilm, digits-cnn (each its own BENCHMARKS.md section)")
    parser.add_argument("--llm", action="store_true",
                        help="add code-llama-tiny (skipped with a message unless already cached)")
    parser.add_argument("--llm-size", default="full", choices=("full", "small"),
                        help="small: a smoke run of the code path, not a figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calib-batches", type=int, default=16, help="×8 train items")
    parser.add_argument("--test-batches", type=int, default=4, help="minilm ×32, code-llama-tiny ×16")
    parser.add_argument("--cnn-batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--distill-steps", type=int, default=100,
                        help="code-llama-tiny recovery: distill steps after the best row per ratio (0: none)")
    parser.add_argument("--distill-batch", type=int, default=8, help="train windows per distill step")
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders: dict[str, Callable[[argparse.Namespace], str]] = {
        "minilm": minilm_section, "digits-cnn": cnn_section, "code-llama-tiny": llm_section}
    names = [s for s in args.sections.split(",") if s] + (["code-llama-tiny"] if args.llm else [])
    for name in names:  # one BENCHMARKS.md section each: a later run can redo one alone
        if name == "code-llama-tiny" and not llm_cached(args.llm_size):
            print(f"code-llama-tiny ({args.llm_size}) is not cached yet: its rows are left for a "
                  "later run (this script does not build it).")
            continue
        load_start = os.getloadavg()[0]
        body = builders[name](args)
        load = (f"Machine load (other engineers share the {os.cpu_count()} cores): 1-min load "
                f"average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
        print(load)
        smoke = name == "code-llama-tiny" and args.llm_size == "small"  # not a figure
        if not args.no_write and not smoke:
            write_section(f"factorize-{name}", TITLES[name],
                          "\n\n".join([conditions_line(args.threads), load, body]))



if __name__ == "__main__":
    main()
