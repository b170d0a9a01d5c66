"""The few things speculative decoding needs from a Hugging Face causal LM, through public
transformers API only: one forward through a KV cache, cropping the cache back, its vocabulary.

The cache argument's name is read from ``forward``'s signature (``cache`` since transformers
5.24, ``past_key_values`` before: :func:`slimline.cache.hf.hooks.cache_argument`), and the
cache is cropped layer by layer through each layer's own ``crop``, whose argument changed
meaning in 5.24 (a count of tokens to remove, negative, instead of the length to keep): read
from its signature as well, never from a version string.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, cast

import torch
from torch import nn


def cache_name(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes (and its output returns) the KV cache."""
    from slimline.cache.hf.hooks import cache_argument

    return cache_argument(type(model))


def why_not(model: nn.Module) -> str | None:
    """Why ``model`` is not a decoder-only Hugging Face LM that generates through a KV cache
    this step can roll back; None when it is."""
    kind = type(model).__name__
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate) or not callable(getattr(model, "generate",
                                                                            None)):
        return f"{kind} is not a Hugging Face generative model (no generate)"
    if not can_generate():
        return f"{kind} cannot generate (no language-model head): not a causal LM"
    if getattr(config, "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder; only decoder-only causal LMs are supported"
    if cache_name(model) is None:
        return f"{kind}.forward takes no KV cache argument (neither `cache` nor `past_key_values`)"
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return f"{kind} uses its own cache type, which cannot be rolled back after a rejection"
    return None


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head: the size of the distributions the model emits."""
    head = cast(Any, model).get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(cast(Any, model).config.get_text_config(decoder=True).vocab_size)


def supports_logits_to_keep(model: nn.Module) -> bool:
    return _takes_logits_to_keep(type(model))  # type: ignore[arg-type]  # classes hash


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    # Read once per class: ``inspect.signature`` on every forward of a small model showed as
    # 5% of a speculative round in profiles.
    return "logits_to_keep" in inspect.signature(cls.forward).parameters  # type: ignore[attr-defined]


@torch.no_grad()
def run(
    model: nn.Module, ids: torch.Tensor, cache: Any | None, keep: int
) -> tuple[torch.Tensor, Any]:
    """Feed ``ids`` (m,) through ``model`` on top of ``cache`` (None: the model builds one,
    through any hook a cache step installed); the float32 logits of the last ``keep``
    positions (keep, V) and the cache, now ``m`` tokens longer."""
    name = cache_name(model)
    if name is None:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache argument")
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs[name] = cache
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=ids.view(1, -1), **kwargs)
    return out.logits[0, -keep:].float(), getattr(out, name)


def cache_length(cache: Any | None) -> int:
    """Tokens the cache holds (in layer 0, which sizes positions and masks)."""
    return 0 if cache is None else int(cache.get_seq_length())


def crop_cache(cache: Any | None, length: int) -> None:
    """Cut every layer of ``cache`` holding more than ``length`` tokens back to ``length``
    (layers holding fewer, e.g. ones a self-draft skipped, are left as they are)."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if layers is None:  # caches without per-layer objects: crop(max_length), all layers
        cache.crop(length)
        return
    for layer in layers:
        current = int(layer.get_seq_length())
        if current > length:
            if _crop_takes_count(type(layer)):
                layer.crop(length - current)  # transformers >= 5.24: remove this many
            else:
                layer.crop(length)  # before: the length to keep


def _crop_takes_count(cls: type) -> bool:
    if cls not in _TAKES_COUNT:
        crop = getattr(cls, "crop")  # noqa: B009 (any cache layer class)
        _TAKES_COUNT[cls] = "tokens_to_remove" in inspect.signature(crop).parameters
    return _TAKES_COUNT[cls]


_TAKES_COUNT: dict[type, bool] = {}
