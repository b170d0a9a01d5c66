"""Handlers found by their config's *type* (as in torchao's quantize_ registry).

``@register(RtnConfig)`` on a handler function records both the handler and the recipe name
``RtnConfig.method``; there is no string switch and no central list of methods. The built-in
method modules are imported on first use by walking the family packages.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.core.config import MethodConfig

C = TypeVar("C", bound=MethodConfig)

# Packages whose modules define methods; each is walked once, lazily.
_METHOD_PACKAGES = (
    "slimline.quantize", "slimline.prune", "slimline.factorize", "slimline.distill",
    "slimline.peft", "slimline.cache", "slimline.speculative", "slimline.compile",
)


@dataclass
class StepContext:
    """What a handler gets besides the model and its config."""

    calibration: list[Batch] | None = None
    # Batches training steps learn from (distill, lora, qat); ``compress`` defaults it to
    # ``calibration``.
    training: list[Batch] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    # The model as it was before the recipe, never to be changed (the ``distill`` teacher);
    # set by ``compress`` only when a step's ``needs_original()``.
    original: nn.Module | None = None


@dataclass
class StepOutcome:
    """What a handler reports: the modules it changed and notes for the user."""

    modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The step as applied, with what it chose from the data written into its fields (the
    # blocks ``speculative`` skips): recorded in place of the given config, so ``sl.load``
    # applies it again without data. None: the config is recorded as given.
    recorded: MethodConfig | None = None


Handler = Callable[[nn.Module, Any, StepContext], StepOutcome]

_HANDLERS: dict[type[MethodConfig], Handler] = {}
_BY_NAME: dict[str, type[MethodConfig]] = {}
_loaded = False


def register(config_type: type[C]) -> Callable[[Callable[[nn.Module, C, StepContext], StepOutcome]], Callable[[nn.Module, C, StepContext], StepOutcome]]:  # noqa: E501
    """Decorator: ``handler(model, config, ctx)`` applies ``config_type`` steps in place."""
    if not config_type.method:
        raise TypeError(f"{config_type.__name__} has no method name")

    def wrap(fn: Callable[[nn.Module, C, StepContext], StepOutcome]) -> Callable[[nn.Module, C, StepContext], StepOutcome]:  # noqa: E501
        existing = _BY_NAME.get(config_type.method)
        if existing is not None and existing is not config_type:
            raise TypeError(f"method name {config_type.method!r} registered twice")
        _HANDLERS[config_type] = fn
        _BY_NAME[config_type.method] = config_type
        return fn

    return wrap


def _load_builtin_methods() -> None:
    """Import every built-in method module once; a failure names the module and is raised
    again by every later call, never left as a half-filled registry ("unknown method")."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # calls made while the modules below import see the registry as it fills
    try:
        for package_name in _METHOD_PACKAGES:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__, package_name + "."):
                _import_method_module(info.name)
    except BaseException:
        _loaded = False
        raise


def _import_method_module(name: str) -> None:
    """Import ``name``; on failure undo what it registered (so that a retry can register it
    again) and raise ImportError naming it."""
    handlers, by_name = dict(_HANDLERS), dict(_BY_NAME)
    try:
        importlib.import_module(name)
    except Exception as exc:
        _HANDLERS.clear()
        _HANDLERS.update(handlers)
        _BY_NAME.clear()
        _BY_NAME.update(by_name)
        raise ImportError(
            f"slimline: importing the method module {name} failed: {type(exc).__name__}: {exc}"
        ) from exc


def handler_for(config: MethodConfig) -> Handler:
    """The handler registered for ``type(config)``."""
    _load_builtin_methods()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise TypeError(f"no handler registered for {type(config).__name__}") from None


def config_type(name: str) -> type[MethodConfig]:
    """The config class for a recipe method name; ValueError listing valid names."""
    _load_builtin_methods()
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    try:
        return _BY_NAME[name]
    except KeyError:
        valid = ", ".join(sorted(_BY_NAME))
        raise ValueError(f"unknown method {name!r}; known methods: {valid}") from None


def registered() -> list[type[MethodConfig]]:
    """Every registered config type, sorted by family rank then name."""
    _load_builtin_methods()
    return sorted(_BY_NAME.values(), key=lambda c: (c.family.rule.rank, c.method))
