"""How a model carrying a ``kv_cache`` spec comes to build a :class:`QuantizedKVCache`.

Only public transformers API is used: a cache object passed to ``forward`` or ``generate``
is what transformers itself documents for custom caches. Two entry points build a cache:

* ``model(input_ids, use_cache=True)`` with no cache: a forward pre-hook passes a fresh
  quantized one (the model would otherwise create a ``DynamicCache`` inside);
* ``model.generate(...)`` with no cache: ``generate`` is wrapped on the instance, and passes
  a fresh quantized cache where ``generate`` would have built its default ``DynamicCache``
  (``use_cache`` not off; no ``cache_implementation`` but the keyword ``"dynamic"``).

A cache the caller passes, or a ``cache_implementation`` they ask for (static, offloaded,
quantized; "dynamic" in a ``GenerationConfig``), is left alone: transformers refuses a cache
object together with a ``cache_implementation``.

The argument's name is read from ``forward``'s signature, never from a version string:
transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works there,
with a deprecation warning, and passing both is an error), and ``generate`` takes the cache
under the name ``forward`` does, since its model kwargs go on to ``forward``.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

from torch import nn

from slimline.cache.hf.quantized_cache import KVQuantSpec, QuantizedKVCache
from slimline.cache.kv_cache import SPEC_ATTR
from slimline.train.recompute import checkpointing_on

# Newest first: ``cache`` since transformers 5.24, ``past_key_values`` from 4.x to 5.23.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(cls: type[nn.Module]) -> str | None:
    """The name under which ``cls.forward`` takes a KV cache; None if it takes none."""
    return next((n for n in CACHE_ARGUMENTS if _param_index(cls, n) is not None), None)


def quantized_cache(model: nn.Module, spec: KVQuantSpec) -> QuantizedKVCache:
    """A fresh cache shaped by ``model``'s decoder config (its layer types)."""
    return QuantizedKVCache(cast(Any, model).config.get_text_config(decoder=True), spec)


def pass_quantized_cache(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: give a cache-using call that brings no cache a quantized one."""
    spec: KVQuantSpec | None = getattr(module, SPEC_ATTR, None)
    name = cache_argument(type(module))
    if spec is None or name is None:
        return None
    at = _param_index(type(module), name)
    if _argument(args, kwargs, at, name) is not None or _cache_given(kwargs):
        return None
    use_cache = _argument(args, kwargs, _param_index(type(module), "use_cache"), "use_cache")
    if use_cache is None:
        use_cache = getattr(cast(Any, module).config, "use_cache", False)
    if not use_cache or (module.training and checkpointing_on(module)):
        return None  # transformers turns the cache off for gradient checkpointing
    cache = quantized_cache(module, spec)
    if at is not None and at < len(args):
        return (*args[:at], cache, *args[at + 1 :]), kwargs
    _drop_cache_kwargs(kwargs)
    kwargs[name] = cache
    return args, kwargs


def generate_with_quantized_cache(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate``, given a fresh quantized cache where it would build its default one."""
    generate = type(self).generate  # type: ignore[attr-defined]
    spec: KVQuantSpec | None = getattr(self, SPEC_ATTR, None)
    name = cache_argument(type(self))
    configs = _generation_configs(self, args, kwargs)
    if spec is None or name is None or _cache_given(kwargs) or not _default(kwargs, configs):
        return generate(self, *args, **kwargs)
    cache = quantized_cache(self, spec)
    # ``generate`` leaves a cache it is passed as it is; an assistant's must record its
    # past, as speculative decoding rolls it back (``crop``).
    if any(_settings(kwargs, configs, "is_assistant")):
        cache.activate_past_recording()
    _drop_cache_kwargs(kwargs)
    kwargs.pop("cache_implementation", None)  # "dynamic", the default, or None
    return generate(self, *args, **kwargs, **{name: cache})


def _default(kwargs: dict[str, Any], configs: list[Any]) -> bool:
    """Whether ``generate`` would build its default ``DynamicCache`` for this call."""
    use_cache = next((v for v in _settings(kwargs, configs, "use_cache") if v is not None), True)
    named = kwargs.get("cache_implementation")
    if named is not None:  # the keyword overrides every config
        return bool(use_cache) and named == "dynamic"
    # transformers refuses a cache object together with any ``cache_implementation``, even
    # "dynamic" in a config: that one is kept, with the float cache it asks for.
    return bool(use_cache) and set(_settings(kwargs, configs, "cache_implementation")) == {None}


def _generation_configs(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """The ``GenerationConfig`` passed to ``generate`` (by name or position), then the model's."""
    passed = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    return [c for c in (passed, getattr(model, "generation_config", None)) if c is not None]


def _settings(kwargs: dict[str, Any], configs: list[Any], key: str) -> list[Any]:
    """``key`` as ``generate``'s keyword, then in each config: the first set one wins."""
    return [kwargs.get(key), *(getattr(c, key, None) for c in configs)]


def _cache_given(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS)


def _drop_cache_kwargs(kwargs: dict[str, Any]) -> None:
    """Remove ``cache=None`` / ``past_key_values=None``: transformers 5.24 refuses both names."""
    for name in CACHE_ARGUMENTS:
        kwargs.pop(name, None)


def _param_index(cls: type[nn.Module], name: str) -> int | None:
    """Position of ``name`` among ``cls.forward``'s arguments after ``self``; None if absent."""
    key = (cls, name)
    if key not in _PARAM_INDEX:
        names = list(inspect.signature(cls.forward).parameters)[1:]
        _PARAM_INDEX[key] = names.index(name) if name in names else None
    return _PARAM_INDEX[key]


_PARAM_INDEX: dict[tuple[type[nn.Module], str], int | None] = {}


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, name: str) -> Any:
    """A forward argument given by position (``index``) or by name; None when absent."""
    if index is not None and index < len(args):
        return args[index]
    return kwargs.get(name)
