"""``kv_cache``: generation with keys and values cached as 8-bit (or 4-bit) integer codes.

The step changes no weight. It makes the model build a :class:`QuantizedKVCache` wherever
it would have built transformers' float ``DynamicCache`` (a forward pre-hook and a wrapped
``generate`` that pass one as the cache argument: :mod:`slimline.cache.hf.hooks`). A cache
the caller passes, or a ``cache_implementation`` they ask for (static, offloaded, quantized),
is left alone. The step's settings live on the model in :data:`SPEC_ATTR`, so a deep copy
carries them, and ``sl.load`` applies the step again (``reapply_on_load``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from torch import nn

from slimline.cache.kv_quant import SUPPORTED_BITS
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.search.ranges import Choice, SearchSpace

if TYPE_CHECKING:
    from slimline.cache.hf.quantized_cache import KVQuantSpec

SPEC_ATTR = "slimline_kv_cache"  # the KVQuantSpec of an applied kv_cache step, on the model


@dataclass(frozen=True, kw_only=True)
class KvCacheConfig(MethodConfig):
    """Store the KV cache of a causal LM as integer codes + float32 scales (KIVI-style).

    Defaults: 8 bits, symmetric, one scale per token and head for keys and values, no
    full-precision window: the cache takes (D + 4) / 4D of its fp32 bytes (0.28 at D = 32).
    On code-llama-tiny this kept the fp32 test perplexity (36.43 either way, chunked through
    the cache; BENCHMARKS.md), so KIVI's per-channel keys, which matter for the outlier key
    channels of large models at 2-4 bits (arXiv 2402.02750, Fig. 2), are an option here
    (``key_axis="channel"``) rather than the default: per-token codes are final as soon as
    a token is written, with no group of tokens to wait for.
    """

    method: ClassVar[str] = "kv_cache"
    family: ClassVar[Family] = Family.CACHE
    summary: ClassVar[str] = "int8/int4 KV cache for generation: keys and values as codes + scales"
    paper: ClassVar[str] = "KIVI, arXiv 2402.02750"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"bits": Choice(4, 8)}
    reapply_on_load: ClassVar[bool] = True

    bits: int = 8
    # "token": one scale per token and head (over D channels); "channel": one per channel
    # over a group of residual_length tokens (KIVI's keys). Values are always per token.
    key_axis: Literal["token", "channel"] = "token"
    # Most recent tokens kept in full precision (KIVI's R). 0: every token is quantized as
    # soon as attention has read it; at 8 bits a window of 32 left perplexity unchanged on
    # code-llama-tiny, for 0.37 instead of 0.28 of the fp32 bytes at 256 tokens.
    residual_length: int = 0
    # Symmetric grids store one float per group; asymmetric ones two (scale and offset).
    symmetric: bool = True

    def check(self) -> None:
        if self.targets.include or self.targets.exclude:
            self.fail("targets", "kv_cache applies to every attention layer; remove targets")
        if self.bits not in SUPPORTED_BITS:
            self.fail("bits", f"must be one of {list(SUPPORTED_BITS)}, got {self.bits}")
        if self.residual_length < 0:
            self.fail("residual_length", f"must be >= 0, got {self.residual_length}")
        if self.key_axis == "channel" and self.residual_length < 1:
            self.fail(
                "residual_length",
                "key_axis='channel' quantizes keys in groups of residual_length tokens; "
                "set it >= 1 (KIVI uses 32 to 128)",
            )

    def spec(self) -> KVQuantSpec:
        """The runtime settings that the cache layers read."""
        from slimline.cache.hf.quantized_cache import KVQuantSpec

        return KVQuantSpec(self.bits, self.key_axis, self.residual_length, self.symmetric)

    def applies_to(self, model: nn.Module) -> bool:
        """Whether ``model`` is a Hugging Face decoder that generates with a KV cache."""
        return why_not(model) is None

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Nothing is replaced; raises (naming the step) where there is no cache to quantize."""
        reason = why_not(model)
        if reason is not None:
            raise ValueError(f"{step or self.method}: {reason}")
        head_dim = _head_dim(model)
        if self.bits == 4 and head_dim % 2:
            self.fail("bits", f"4-bit codes are packed in pairs; head_dim {head_dim} is odd")
        return []


@register(KvCacheConfig)
def apply_kv_cache(model: nn.Module, cfg: KvCacheConfig, ctx: StepContext) -> StepOutcome:
    """Make ``model`` build quantized caches (idempotent: ``sl.load`` runs it again)."""
    from slimline.cache.hf.hooks import (
        generate_with_quantized_cache,
        pass_quantized_cache,
        quantized_cache,
    )

    spec = cfg.spec()
    hooked = SPEC_ATTR in vars(model)  # a deep copy of a hooked model carries its hook
    setattr(model, SPEC_ATTR, spec)
    if not hooked:
        model.register_forward_pre_hook(pass_quantized_cache, with_kwargs=True)
    # An instance attribute shadows the class's method; deepcopy rebinds it to the copy.
    cast(Any, model).generate = types.MethodType(generate_with_quantized_cache, model)
    layers = quantized_cache(model, spec).quantized_layers
    grid = "symmetric" if cfg.symmetric else "asymmetric"
    notes = [
        f"{layers} attention layer(s) cache keys/values as {cfg.bits}-bit codes ({grid}, "
        f"keys per {cfg.key_axis}, values per token), last {cfg.residual_length} token(s) "
        "in full precision",
    ]
    return StepOutcome(modules=[""], notes=notes)


def why_not(model: nn.Module) -> str | None:
    """Why ``model`` has no KV cache this step can quantize; None when it has one."""
    kind = type(model).__name__
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or getattr(model, "config", None) is None:
        return f"{kind} is not a Hugging Face generative model, so it has no KV cache"
    if not can_generate():
        return f"{kind} cannot generate (no language-model head), so it has no KV cache"
    if getattr(_config(model), "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder; only decoder-only KV caches are supported"
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return f"{kind} uses its own cache type, not transformers' DynamicCache"
    from slimline.cache.hf.hooks import cache_argument, quantized_cache
    from slimline.cache.hf.quantized_cache import KVQuantSpec

    if cache_argument(type(model)) is None:
        import transformers

        return (
            f"{kind}.forward takes no KV cache argument: neither `cache` (its name since "
            "transformers 5.24) nor `past_key_values` (before), so no cache can be passed to "
            f"it (transformers {transformers.__version__})"
        )
    if quantized_cache(model, KVQuantSpec()).quantized_layers == 0:
        return f"{kind} has no full-attention layer whose cache could be quantized"
    return None


def _config(model: nn.Module) -> Any:
    return cast(Any, model).config


def _text_config(model: nn.Module) -> Any:
    return _config(model).get_text_config(decoder=True)


def _head_dim(model: nn.Module) -> int:
    config = _text_config(model)
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)
