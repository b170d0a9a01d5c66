"""Causal LMs with slimline's packed layers generate through transformers' static KV cache.

At batch 1 a decode step of a model whose linear layers run slimline's gemv kernels reads
its weights in a few milliseconds, and what else the step does becomes a large share of the
token: transformers' default ``DynamicCache`` grows every layer's keys and values by a
``torch.cat`` each token (a copy of the whole cache so far) and rebuilds the attention mask.
The static cache (``cache_implementation="static"``, public ``GenerationConfig`` API) is
allocated once for the call's ``max_length`` and written in place. Measured with
``benchmarks/decode.py`` on ``llama-1b-random`` (2 threads, 64 new tokens): rtn int4 g128
with int8 activations 16.7 → 21.6 tokens/s, with float32 activations 13.6 → 15.2; greedy
output unchanged (tested).

So ``compress`` (and ``load``) set it on such a model's ``generation_config`` when nothing
else chose the cache: the config names none, the model class declares static-cache support
(transformers' ``_can_compile_fullgraph``, read with a default so a class without it is left
alone), and no step needs a growing cache — ``kv_cache`` builds its own quantized one and
``speculative`` crops its cache back after each rejected draft. A later such step undoes what
this set; a cache the user names (in the config or the call) is theirs. The cost: attention
reads the whole allocated cache each step, so a call whose ``max_new_tokens`` far exceeds
what it generates does extra attention work; pass ``cache_implementation="dynamic"`` there.
"""

from __future__ import annotations

from typing import Any

from torch import nn

SET_ATTR = "slimline_static_cache"  # True on a model whose static cache slimline chose
STATIC = "static"


def choose_decode_cache(model: nn.Module) -> str | None:
    """Set (or undo) the static-cache default on ``model``; returns a note when it changed."""
    config = _generation_config(model)
    if config is None:  # before any import: ``load`` calls this for every model
        return None
    from slimline.cache.kv_cache import SPEC_ATTR
    from slimline.speculative.generate import RUNTIME_ATTR

    ours = bool(getattr(model, SET_ATTR, False))
    grows = getattr(model, SPEC_ATTR, None) is not None or hasattr(model, RUNTIME_ATTR)
    if ours:
        if config.cache_implementation != STATIC:  # the user chose another since
            setattr(model, SET_ATTR, False)
        elif grows:
            config.cache_implementation = None
            setattr(model, SET_ATTR, False)
            return "generate: dynamic KV cache again (a step builds or crops its own)"
        return None
    if grows or not wants_static_cache(model, config):
        return None
    config.cache_implementation = STATIC
    setattr(model, SET_ATTR, True)
    return "generate: static KV cache (packed layers decode faster without the cache's copies)"


def wants_static_cache(model: nn.Module, config: Any) -> bool:
    """Whether nothing chose a cache and ``model`` decodes through packed layers."""
    from slimline.quantize.qlinear import QuantLinear

    model_config = getattr(model, "config", None)
    return (
        config.cache_implementation is None
        and config.use_cache is not False
        and not getattr(model_config, "is_encoder_decoder", False)
        and bool(getattr(type(model), "_can_compile_fullgraph", False))
        and any(isinstance(m, QuantLinear) for m in model.modules())
    )


def _generation_config(model: nn.Module) -> Any | None:
    """The model's ``GenerationConfig`` when it is a transformers generator, else None."""
    config = getattr(model, "generation_config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        return None
    return config if hasattr(config, "cache_implementation") else None
