"""Decode speed of causal LMs: tokens/s of greedy ``generate``, and what speculation kept.

A forward's latency says little about what a user of a causal LM feels, which is tokens per
second of ``generate``. The ``generation`` metric times greedy ``generate`` of a fixed number of
new tokens (``min_new_tokens`` = ``max_new_tokens``, so an early end-of-sequence cannot flatter a
model) from one prompt: the first row of the first batch, its padding removed. Models are timed
interleaved, as latency is (MEASURING.md). For a model with a ``speculative`` step, the
acceptance rate and tokens per target forward of the timed calls come from its
``speculative_stats`` (reset before timing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.evaluate import bench

NEW_TOKENS = 32  # new tokens per timed call
STATS_ATTR = "speculative_stats"  # set by the speculative step (speculative/generate.py)


def can_generate(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model that generates text (a causal LM)."""
    check = getattr(model, "can_generate", None)
    return callable(check) and bool(check()) and callable(getattr(model, "generate", None))


def prompt_of(batch: Batch) -> torch.Tensor:
    """The first row of ``batch``'s ``input_ids`` without its padding, as a (1, n) prompt."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("generation: batches must be dicts with input_ids")
    ids = batch["input_ids"][0]
    mask = batch.get("attention_mask")
    if mask is not None:
        ids = ids[mask[0].bool()]
    if ids.numel() == 0:
        raise ValueError("generation: the first row of the first batch is all padding")
    return ids.unsqueeze(0)


def _generate_call(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = prompt.to(device)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "eos_token_id", None) or 0

    generate = cast(Callable[..., Any], model.generate)

    def run() -> Any:
        with torch.inference_mode():
            return generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=pad)  # fmt: skip

    return run


def measure_generation(
    models: Mapping[str, nn.Module], prompt: torch.Tensor, *, runs: int, warmup: int,
    new_tokens: int = NEW_TOKENS, sync: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per model: ``generate_tokens_per_s`` (median of ``runs`` interleaved calls; prompt
    processing included), and for speculative models ``acceptance_rate`` and
    ``tokens_per_target_forward`` over the timed calls."""
    calls = {name: _generate_call(m, prompt, new_tokens) for name, m in models.items()}
    for name, call in calls.items():  # warm up first, so the stats count the timed calls only
        for _ in range(max(warmup, 1)):
            call()
        stats = getattr(models[name], STATS_ATTR, None)
        if stats is not None:
            stats.reset()
    timings = bench.time_interleaved(calls, runs=runs, warmup=0, sync=sync)
    out: dict[str, dict[str, float]] = {}
    for name, timing in timings.items():
        figures = {"generate_tokens_per_s": new_tokens / (timing.median_ms / 1000.0)}
        stats = getattr(models[name], STATS_ATTR, None)
        if stats is not None:
            figures.update(acceptance_rate=stats.acceptance_rate,
                           tokens_per_target_forward=stats.tokens_per_round)
        out[name] = figures
    return out
