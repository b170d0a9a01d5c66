"""Speculative decoding: decode tokens/s of every ``speculative`` mode against plain ``generate``
and against transformers' own assisted decoding (the peer a user would pick), in one process.

Target: ``code-llama-tiny``; greedy, batch 1, ``--prompt-len`` tokens of prompt, ``--new-tokens``
new tokens (``min_new_tokens`` = ``max_new_tokens``, so every row generates the same count).
Two kinds of prompts, both from the test split:

* **free completion**: the first ``--prompt-len`` tokens of a test window;
* **repeating context**: half a window, then its first quarter again — an edit of code already
  in the context, where copying pays (what prompt lookup is for).

Rows: plain ``generate``; transformers ``prompt_lookup_num_tokens``; slimline ``prompt_lookup``;
slimline ``self`` (half the blocks skipped, chosen by Block Influence on train data); the
draft model (``layer_drop`` of half the blocks, then ``distill`` from the target on the train
split: built here and saved by ``sl.save`` under ``$SLIMLINE_CACHE``) through slimline
``draft`` mode and through transformers' ``assistant_model``; with ``--fast-decode`` also
``fast_decode`` alone and under ``prompt_lookup`` / ``self`` (each verification round one
written-out call). Every row's output is compared
token for token with plain greedy output. Rows run interleaved, one full pass over the prompts
per row per round; tokens/s is the median over rounds; acceptance and tokens per target
forward come from ``model.speculative_stats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from slimline.models import load_builtin
from slimline.models.cache import cache_root

SECTION = "speculative"
TITLE = "Speculative decoding: code-llama-tiny, greedy, batch 1"


def prompts(built: Any, kind: str, n: int, length: int) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens (see the module docstring for the two kinds)."""
    windows = [b["input_ids"][0] for b in built.batches("test", batch_size=1, limit=n)]
    if kind == "free":
        return [w[:length].unsqueeze(0) for w in windows]
    half, quarter = length // 2, length // 4
    return [torch.cat([w[:half], w[:quarter]]).unsqueeze(0) for w in windows]


def build_draft(built: Any, args: argparse.Namespace) -> Path:
    """The draft: half the target's blocks dropped, then distilled; cached by its settings."""
    n_layers = built.model.config.num_hidden_layers // 2
    directory = cache_root() / f"code-llama-tiny-{args.size}-draft-drop{n_layers}-distill{args.draft_steps}"
    if (directory / "recipe.json").exists():
        return directory
    train = built.batches("train", batch_size=8, limit=args.draft_steps)
    recipe = {"steps": [{"method": "layer_drop", "n_layers": n_layers},
                        {"method": "distill", "steps": args.draft_steps, "lr": 1e-3,
                         "warmup": max(args.draft_steps // 10, 1)}]}
    start = time.perf_counter()
    result = sl.compress(built.model, recipe, calibration=train[:8], training=train, progress=True)
    print(f"draft built in {time.perf_counter() - start:.0f} s: {[n for r in result.steps for n in r.notes]}")
    sl.save(result.model, directory)
    return directory


def speculative(model: nn.Module, calibration: list[Any], fast: bool = False, **fields: Any) -> nn.Module:
    steps = [{"method": "speculative", **fields}] if fields else []
    steps += [{"method": "fast_decode"}] if fast else []
    return sl.compress(model, {"steps": steps}, calibration=calibration).model


def base_of(name: str) -> str:
    """The row a variant is compared with in the "× its base" column."""
    return "slimline fast_decode" if name.endswith("+ fast_decode") else "plain generate"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draft-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast-decode", action="store_true",
                        help="also fast_decode alone and under prompt_lookup / self (verify rounds written out)")
    parser.add_argument("--section-suffix", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]

    built = load_builtin("code-llama-tiny", size=args.size)
    target = built.model.eval()
    calibration = built.batches("train", batch_size=8, limit=4)
    draft_dir = build_draft(built, args)
    draft = sl.load(draft_dir).eval()
    gamma = args.gamma
    models: dict[str, tuple[nn.Module, dict[str, Any]]] = {
        "plain generate": (target, {}),
        "transformers prompt lookup": (target, {"prompt_lookup_num_tokens": gamma}),
        "slimline prompt_lookup": (speculative(target, calibration, mode="prompt_lookup", gamma=gamma), {}),
        "slimline self": (speculative(target, calibration, mode="self", gamma=gamma), {}),
        "slimline draft": (speculative(target, calibration, mode="draft", draft=str(draft_dir), gamma=gamma), {}),
        "transformers assistant_model": (target, {"assistant_model": draft}),
    }
    if args.fast_decode:
        models["slimline fast_decode"] = (speculative(target, calibration, fast=True), {})
        for mode in ("prompt_lookup", "self"):
            models[f"slimline {mode} + fast_decode"] = (
                speculative(target, calibration, fast=True, mode=mode, gamma=gamma), {})
    header = ["prompts", "variant", "tokens/s (median)", "× plain", "× its base", "acceptance",
              "tokens / target forward", "output = plain greedy"]
    rows: list[list[Any]] = []
    for kind in ("free", "repeat"):
        inputs = prompts(built, kind, args.prompts, args.prompt_len)
        generated = args.new_tokens * len(inputs)

        def run(model: nn.Module, extra: dict[str, Any],
                inputs: list[torch.Tensor] = inputs) -> Callable[[], list[torch.Tensor]]:
            def go() -> list[torch.Tensor]:
                with torch.inference_mode():
                    return [model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           pad_token_id=0, **extra) for x in inputs]
            return go

        calls = {name: run(m, extra) for name, (m, extra) in models.items()}
        reference = calls["plain generate"]()
        identical = {name: all(torch.equal(a, b) for a, b in zip(call(), reference, strict=True))
                     for name, call in calls.items()}  # also the warm-up
        for m, _ in models.values():
            stats = getattr(m, "speculative_stats", None)
            if stats is not None:
                stats.reset()
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - start)
        plain = generated / statistics.median(seconds["plain generate"])
        for name, (m, _) in models.items():
            speed = generated / statistics.median(seconds[name])
            stats = getattr(m, "speculative_stats", None)
            accept = f"{stats.acceptance_rate:.2f}" if stats is not None else "-"
            per_forward = f"{stats.tokens_per_round:.2f}" if stats is not None else "-"
            base = generated / statistics.median(seconds[base_of(name)])
            rows.append(["free completion" if kind == "free" else "repeating context", name, f"{speed:.1f}",
                         f"{speed / plain:.2f}", f"{speed / base:.2f}", accept, per_forward,
                         "yes" if identical[name] else "**no**"])
        print_table(TITLE, header, rows)
    if args.no_write:
        return
    layers = target.config.num_hidden_layers
    body = "\n\n".join([
        conditions_line(args.threads, model=f"code-llama-tiny ({args.size}, {layers} blocks)",
                        prompts=f"{args.prompts} × {args.prompt_len} tokens", new_tokens=args.new_tokens,
                        gamma=gamma, rounds=args.rounds),
        f"Run started {started}; 1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        "the end (2 cores shared with other jobs: compare within a table).",
        f"Draft: `layer_drop(n_layers={layers // 2}) → distill(steps={args.draft_steps}, lr=0.001)` from the "
        "target on the train split, saved with `sl.save`; the same draft for slimline `draft` mode and "
        "transformers' `assistant_model`. slimline `self` skips half the blocks (Block Influence on 4 train "
        f"batches). Fixed gamma {gamma}; transformers' assisted decoding adapts its own draft length. "
        "× its base: a `+ fast_decode` row against slimline fast_decode alone, every other row against "
        "plain generate.",
        markdown_table(header, rows),
    ])
    write_section(SECTION + args.section_suffix + isa_suffix(), TITLE, body)


if __name__ == "__main__":
    main()
