"""``generate`` on a model with a ``speculative`` step: the wrapper and its decoding loop.

The wrapper calls the ``generate`` that was in effect before the step (transformers' own, or
a ``kv_cache`` step's wrapper) with ``custom_generate=`` the speculative loop, so every
option transformers resolves (generation config, defaults, processors, stopping criteria,
cache) is resolved by transformers itself. A call the loop does not cover — beam search,
streamers, scores or attentions in the output, a fixed-size cache, transformers' own
assisted decoding, stop strings — runs through plain ``generate`` unchanged; the model's
``speculative_stats.fallbacks`` counts it and a warning names why.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from slimline.speculative import hf
from slimline.speculative.decode import (
    Drafter,
    Gamma,
    Limits,
    LookupDrafter,
    ModelDrafter,
    Scorer,
    SelfDrafter,
    Target,
    Unsupported,
    decode_row,
)
from slimline.speculative.stats import SpeculativeStats

RUNTIME_ATTR = "slimline_speculative"  # the Runtime of an applied step, on the model
STATS_ATTR = "speculative_stats"  # SpeculativeStats of every call since the step was applied
LAST_ATTR = "speculative_last"  # SpeculativeStats of the latest call

# ``generate`` arguments that ask for another decoding loop, or for things this one does not
# produce: such calls run plain.
_PLAIN_ONLY = (
    "assistant_model", "assistant_tokenizer", "prompt_lookup_num_tokens",
    "assistant_early_exit", "streamer", "custom_generate", "negative_prompt_ids",
    "negative_prompt_attention_mask", "inputs_embeds", "stop_strings", "tokenizer",
)  # fmt: skip
# What ``generate`` passes on to a decoding loop that the loop understands.
_MODEL_KWARGS = frozenset({
    "attention_mask", "position_ids", "logits_to_keep", "use_cache", "cache", "past_key_values",
    "cache_position",
})  # fmt: skip
_OUTPUT_FLAGS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@dataclass
class Runtime:
    """What speculative ``generate`` needs, kept on the model (outside its ``state_dict``)."""

    mode: Literal["draft", "self", "prompt_lookup"]
    gamma: int
    adaptive: bool
    max_gamma: int
    ngram: int
    draft: nn.Module | None = None  # mode "draft"
    blocks: str = ""  # mode "self": the block list's name, and the blocks skipped
    skip: tuple[int, ...] = ()
    tuple_len: int = 0  # how the blocks return hidden states (layer_skip.output_form)
    inner: Callable[..., Any] | None = None  # generate before the step (unbound); None: class's


def speculative_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate``, speculative where the call allows it (same arguments, same output)."""
    runtime: Runtime = getattr(self, RUNTIME_ATTR)
    inner = runtime.inner or type(self).generate  # type: ignore[attr-defined]
    why = _plain_only(self, args, kwargs)
    if why is None:
        call = SpeculativeStats()
        try:
            out = inner(self, *args, custom_generate=_loop(runtime, call), **kwargs)
        except Unsupported as exc:
            why = str(exc)
        else:
            if call.calls == 0:  # a transformers that ignored the callable: generate ran plain
                call.fallbacks, call.last_fallback = 1, "custom_generate was not called"
            _record(self, call)
            return out
    fallback = SpeculativeStats(fallbacks=1, last_fallback=why)
    _record(self, fallback)
    warnings.warn(f"speculative: plain generate for this call: {why}", stacklevel=2)
    return inner(self, *args, **kwargs)


def _record(model: nn.Module, call: SpeculativeStats) -> None:
    total: SpeculativeStats = getattr(model, STATS_ATTR)
    total.add(call)
    setattr(model, LAST_ATTR, call)


def _plain_only(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why this call must run plain, judged from its arguments; None when it need not."""
    if len(args) > 4:
        return "positional arguments past stopping_criteria"
    given = [k for k in _PLAIN_ONLY if kwargs.get(k) is not None]
    if given:
        return f"generate option(s) {', '.join(given)}"
    if kwargs.get("synced_gpus"):
        return "synced_gpus"
    configs = [kwargs.get("generation_config", args[1] if len(args) > 1 else None),
               getattr(model, "generation_config", None)]
    if any(getattr(c, "stop_strings", None) for c in configs if c is not None):
        return "stop_strings (transformers passes no tokenizer to a custom decoding loop)"
    return None


def _applied_in_order(processors: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``generate``'s logits processors as one callable. ``LogitsProcessorList.__call__``
    inspects every member's signature on every call (a cost per verified position that showed
    in profiles); members taking just ``(input_ids, scores)`` — transformers' own — are
    called directly, the same calls in the same order. Others keep the list's own call."""
    members = list(processors)
    if any(len(inspect.signature(m.__call__).parameters) > 2 for m in members):
        return cast(Callable[[torch.Tensor, torch.Tensor], torch.Tensor], processors)

    def apply(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for member in members:
            scores = member(input_ids, scores)
        return scores

    return apply


def _loop(runtime: Runtime, stats: SpeculativeStats) -> Callable[..., Any]:
    """The ``custom_generate`` decoding loop for one call."""

    def loop(
        model: nn.Module, input_ids: torch.Tensor, logits_processor: Any,
        stopping_criteria: Any, generation_config: Any, **model_kwargs: Any,
    ) -> Any:
        start = time.perf_counter()
        cache = _check_call(generation_config, input_ids, model_kwargs)
        stats.calls = 1
        device = next(model.parameters()).device  # generate accepts CPU inputs for any device
        input_ids = input_ids.to(device)
        pads = _left_padding(input_ids, model_kwargs.get("attention_mask"))
        scorer = Scorer(_applied_in_order(logits_processor), plain=len(logits_processor) == 0,
                        sampling=generation_config.get_generation_mode().name == "SAMPLE")
        limits = Limits(stopping_criteria, int(generation_config.max_length))
        gamma = Gamma(runtime.gamma, runtime.adaptive, runtime.max_gamma,
                      _copy(getattr(model, STATS_ATTR)))
        vocab = hf.vocab_size(model)
        rows, target = [], Target(model, cache)
        for r, row in enumerate(input_ids):
            # one row: the cache generate prepared; several: one fresh cache per row
            target = Target(model, cache if input_ids.shape[0] == 1 else None)
            rows.append(decode_row(target, _drafter(runtime, model, target, device), scorer,
                                   row[pads[r]:], row[: pads[r]], limits, gamma, stats, vocab))
        stats.seconds += time.perf_counter() - start
        sequences = _assemble(input_ids, rows, _pad_id(generation_config))
        if not generation_config.return_dict_in_generate:
            return sequences
        return _as_output(model, sequences, target.cache if len(rows) == 1 else None)

    return loop


def _as_output(model: nn.Module, sequences: torch.Tensor, cache: Any | None) -> Any:
    """What ``generate(return_dict_in_generate=True)`` returns: sequences and, for one row,
    the cache (all tokens but the last, as plain generate leaves it)."""
    from transformers.generation import GenerateDecoderOnlyOutput

    name = hf.cache_name(model) or "past_key_values"
    return GenerateDecoderOnlyOutput(sequences=cast(torch.LongTensor, sequences),
                                     **{name: cache})


def _copy(stats: SpeculativeStats) -> SpeculativeStats:
    out = SpeculativeStats()
    out.add(stats)
    return out


def _drafter(runtime: Runtime, model: nn.Module, target: Target, device: torch.device) -> Drafter:
    if runtime.mode == "prompt_lookup":
        return LookupDrafter(runtime.ngram)
    if runtime.mode == "self":
        blocks = model.get_submodule(runtime.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"speculative: {runtime.blocks} is not a ModuleList")
        return SelfDrafter(target, blocks, runtime.skip, runtime.tuple_len)
    draft = runtime.draft
    if draft is None:
        raise ValueError("speculative: mode 'draft' without a loaded draft model")
    if next(draft.parameters()).device != device:
        draft.to(device)
    return ModelDrafter(draft)


def _check_call(config: Any, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> Any:
    """The cache ``generate`` prepared; Unsupported (before any forward) for what the loop
    does not cover."""
    mode = config.get_generation_mode().name
    if mode not in ("GREEDY_SEARCH", "SAMPLE"):
        raise Unsupported(f"generation mode {mode.lower()} (speculation covers greedy and "
                          "sampling)")
    flags = [f for f in _OUTPUT_FLAGS if getattr(config, f, False)]
    if flags:
        raise Unsupported(f"{', '.join(flags)} requested")
    if getattr(config, "guidance_scale", None) not in (None, 1, 1.0):
        raise Unsupported("classifier-free guidance (guidance_scale)")
    extra = sorted(set(model_kwargs) - _MODEL_KWARGS)
    if extra:
        raise Unsupported(f"model inputs {', '.join(extra)}")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is None or not model_kwargs.get("use_cache", True):
        raise Unsupported("use_cache=False (speculation verifies through the KV cache)")
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "is_sliding", False) or layer.get_max_length() != -1:
            raise Unsupported(f"a fixed-size or sliding cache layer ({type(layer).__name__})")
    have = hf.cache_length(cache)
    if have and (input_ids.shape[0] > 1 or have >= input_ids.shape[1]):
        raise Unsupported("a cache given with past tokens, for a batch or the whole input")
    return cache


def _left_padding(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    """Padding tokens before each row's first real one; Unsupported for other padding."""
    if mask is None:
        return [0] * input_ids.shape[0]
    real = mask.to(torch.bool)
    pads = (~real).to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading zeros per row
    if int(real.sum()) != int((input_ids.shape[1] - pads).sum()):
        raise Unsupported("an attention mask that is not left padding")
    if bool((pads >= input_ids.shape[1]).any()):
        raise Unsupported("a row with no real token")
    return [int(p) for p in pads]


def _pad_id(config: Any) -> int:
    pad = config.pad_token_id
    if pad is None:
        eos = config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return int(pad) if pad is not None else 0


def _assemble(input_ids: torch.Tensor, rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    """(B, T + N): each row's input and new tokens, padded after with ``pad`` (as
    ``generate`` pads the rows that finished first)."""
    width = max(r.numel() for r in rows)
    out = input_ids.new_full((input_ids.shape[0], width), pad)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return torch.cat([input_ids, out], dim=1)
