"""KV-cache quantization on code-llama-tiny: cache bytes, tokens/s, agreement, perplexity.

Rows, all in one process, on the full code-llama-tiny (4 layers, 2 KV heads of 32 channels,
max sequence 256): fp32 (transformers' ``DynamicCache``); slimline ``kv_cache`` at 8 and 4
bits (per token; with a full-precision window; KIVI-style per-channel keys); transformers'
own ``QuantizedCache`` beside them, with its fp8 backend (per tensor) and its optimum-quanto
int4 backend (the quanto row is skipped, with the reason, where quanto is missing).

Columns:

- KV bytes: every tensor the cache holds after generating (codes, scales, offsets, the
  full-precision window; tensor subclasses counted through their inner tensors), against
  fp32's — the cache holds the 64-token prompt and 191 of the 192 new tokens;
- tokens/s: new tokens per second of greedy ``generate`` (batch × 192 over the median of
  interleaved runs, prefill included). slimline rows call ``generate`` with no argument:
  the step makes the model build its quantized cache;
- agreement: share of the greedy new tokens equal to fp32's at the same position (one early
  difference changes the rest of that row's continuation);
- perplexity on the test split, teacher-forced in chunks of 16 tokens through the cache, so
  that every chunk attends to the cached (quantized) keys and values of all earlier chunks;
  fp32 goes through the same chunks with a ``DynamicCache``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
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
from slimline.cache.hf.hooks import cache_argument
from slimline.cache.hf.quantized_cache import QuantizedKVLayer
from slimline.evaluate.metrics import next_token_nll, perplexity
from slimline.models import load_builtin

MiB = 2**20

# (label, slimline kv_cache step fields) — None is the fp32 baseline.
SLIMLINE: list[tuple[str, dict[str, Any] | None]] = [
    ("fp32 DynamicCache", None),
    ("slimline int8 (per token, symmetric)", {"bits": 8}),
    ("slimline int8, last 32 tokens fp32", {"bits": 8, "residual_length": 32}),
    ("slimline int4 (per token, symmetric)", {"bits": 4}),
    ("slimline int4 KIVI (keys per channel, groups/window 32, asym.)",
     {"bits": 4, "key_axis": "channel", "residual_length": 32, "symmetric": False}),
]
# transformers' QuantizedCache: (label, cache_config, module it needs)
PEERS: list[tuple[str, dict[str, Any], str | None]] = [
    ("transformers QuantizedCache fp8 (per tensor)", {"backend": "fp8"}, None),
    ("transformers QuantizedCache quanto int4 (group 32, window 32)",
     {"backend": "quanto", "nbits": 4, "q_group_size": 32, "residual_length": 32}, "optimum.quanto"),
]


class Row:
    """One way of caching: how to generate with it and how to build its cache by hand."""

    def __init__(self, label: str, model: nn.Module, generate_kwargs: dict[str, Any],
                 make_cache: Callable[[], Any] | None) -> None:
        self.label, self.model, self.kwargs, self.make_cache = label, model, generate_kwargs, make_cache

    def generate(self, ids: torch.Tensor, new: int) -> Any:
        with torch.inference_mode():
            return self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       return_dict_in_generate=True, **self.kwargs)


def build_rows(base: nn.Module) -> tuple[list[Row], list[str]]:
    from transformers.cache_utils import DynamicCache, QuantizedCache

    rows, skipped = [], []
    for label, step in SLIMLINE:
        if step is None:
            rows.append(Row(label, base, {}, lambda: DynamicCache(config=base.config)))
        else:  # the compressed model builds its own cache (forward hook / generate)
            rows.append(Row(label, sl.compress(base, {"steps": [{"method": "kv_cache", **step}]}).model, {}, None))
    for label, cache_config, needs in PEERS:
        if needs and not installed(needs):
            skipped.append(f"{label}: skipped, {needs} is not installed")
            continue
        kwargs = {"cache_implementation": "quantized", "cache_config": dict(cache_config)}

        def make(cc: dict[str, Any] = cache_config) -> Any:
            return QuantizedCache(config=base.config, **cc)

        rows.append(Row(label, base, kwargs, make))
    return rows, skipped


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (``find_spec`` raises for a dotted name whose
    parent package is missing, e.g. ``optimum.quanto`` without ``optimum``)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def stored_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the tensors ``obj`` holds (tensors, tuples, subclasses' inner tensors)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(stored_bytes(getattr(obj, n), seen) for n in names)
        key = obj.untyped_storage().data_ptr() + obj.storage_offset() * obj.element_size()
        if obj.numel() == 0 or key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(stored_bytes(o, seen) for o in obj)
    return 0


def cache_bytes(cache: Any) -> int:
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            total += layer.nbytes()
        else:
            total += sum(stored_bytes(v, seen) for v in vars(layer).values())
    return total


def cache_name(model: nn.Module) -> str:
    """The forward argument and output field of the cache (``cache`` since transformers 5.24)."""
    return cache_argument(type(model)) or "past_key_values"


def chunked_perplexity(row: Row, data: list[dict[str, torch.Tensor]], chunk: int) -> float:
    """Teacher-forced test perplexity, ``chunk`` tokens per forward through the cache."""
    nll, count, name = 0.0, 0, cache_name(row.model)
    with torch.inference_mode():
        for batch in data:
            ids = batch["input_ids"]
            cache = row.make_cache() if row.make_cache else None  # slimline: the hook makes it
            logits = []
            for start in range(0, ids.shape[1], chunk):
                out = row.model(input_ids=ids[:, start : start + chunk], use_cache=True, **{name: cache})
                cache = getattr(out, name)
                logits.append(out.logits)
            s, n = next_token_nll(torch.cat(logits, dim=1), ids)
            nll, count = nll + s, count + n
    return perplexity(nll, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # One thread: the machine is shared, and with two threads intra-op barriers stalled
    # parallel ops whenever the other core was busy (tens of ms for a 0.5 MB copy).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ppl-batches", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    built = load_builtin("code-llama-tiny")
    base = built.model.eval()
    prompts = built.batches("test", batch_size=args.batch_size, limit=1)[0]["input_ids"][:, : args.prompt]
    data = built.batches("test", batch_size=args.batch_size, limit=args.ppl_batches)
    rows, skipped = build_rows(base)

    # The first round (tokens, caches) is also the timing's warm-up.
    first = {row.label: row.generate(prompts, args.new_tokens) for row in rows}
    reference = first[rows[0].label].sequences[:, args.prompt :]
    name = cache_name(base)
    fp32_bytes = cache_bytes(getattr(first[rows[0].label], name))
    timings = interleaved({row.label: (lambda r=row: r.generate(prompts, args.new_tokens)) for row in rows},
                          runs=args.runs, warmup=0)
    new_tokens = args.batch_size * args.new_tokens
    header = ["cache", "KV bytes (MiB)", "vs fp32", "tokens/s", "vs fp32", "greedy agreement",
              "test perplexity"]
    table = []
    fp32_rate = timings[rows[0].label].throughput(new_tokens)
    for row in rows:
        out = first[row.label]
        nbytes = cache_bytes(getattr(out, name))
        rate = timings[row.label].throughput(new_tokens)
        agree = float((out.sequences[:, args.prompt :] == reference).float().mean())
        ppl = chunked_perplexity(row, data, args.chunk)
        table.append([row.label, f"{nbytes / MiB:.3f}", f"{nbytes / fp32_bytes:.3f}", f"{rate:.0f}",
                      f"{rate / fp32_rate:.2f}", f"{agree:.1%}", f"{ppl:.4f}"])
    print_table("KV-cache quantization: code-llama-tiny", header, table)
    items = args.ppl_batches * args.batch_size
    cond = conditions_line(
        args.threads, batch_size=args.batch_size, prompt_tokens=args.prompt,
        new_tokens=f"{args.new_tokens} greedy", timing=f"median of {args.runs} interleaved generate runs after 1 warm-up round",
        perplexity=f"{items} test sequences of 256 tokens, teacher-forced in chunks of {args.chunk}",
    )
    body = [
        cond,
        f"**code-llama-tiny** (full; 4 layers, 2 KV heads × 32 channels); agreement over "
        f"{args.batch_size} prompts × {args.new_tokens} tokens. Timing caveat: the CPU was "
        "shared with other jobs while this ran, so tokens/s are noisy (interleaving keeps the rows "
        "comparable, not the absolute figures). int8 per token stores D = 32 one-byte codes and one "
        "float32 scale per token and head: (32 + 4) / 128 = 0.281 of fp32.",
        markdown_table(header, table),
    ]
    body += [f"- {note}" for note in skipped]
    if not args.no_write:
        write_section("kv-cache", "KV-cache quantization (kv_cache)", "\n\n".join(body))


if __name__ == "__main__":
    main()
