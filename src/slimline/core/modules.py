"""Compressed module types that a checkpoint can rebuild without pickle.

A method that swaps a layer for its own module class (a packed int4 Linear, say) registers
that class here. The class describes itself with JSON (``slimline_meta``) and can build an
empty instance from it (``from_slimline_meta``); ``sl.load`` builds that instance in place
of the original layer and then fills its tensors from ``model.safetensors``.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import nn


@runtime_checkable
class CompressedModule(Protocol):
    """What a registered module class provides."""

    def slimline_meta(self) -> dict[str, Any]:
        """JSON-able description: shapes, bits, group size... enough to rebuild it empty."""
        ...

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> nn.Module:
        """An instance with the right tensor shapes and dtypes, to be filled by load."""
        ...


M = TypeVar("M", bound=type[nn.Module])

_MODULE_TYPES: dict[str, type[nn.Module]] = {}


def register_module(cls: M) -> M:
    """Class decorator: allow ``cls`` to be rebuilt by ``sl.load`` (an allow-list)."""
    for attr in ("slimline_meta", "from_slimline_meta"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} lacks {attr}()")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def module_type(name: str) -> type[nn.Module]:
    """The registered class called ``name``; ValueError if it is not on the allow-list."""
    from slimline.core.registry import _load_builtin_methods

    _load_builtin_methods()
    try:
        return _MODULE_TYPES[name]
    except KeyError:
        raise ValueError(f"checkpoint names unknown module type {name!r}") from None


def is_registered_module(module: nn.Module) -> bool:
    return _MODULE_TYPES.get(type(module).__name__) is type(module)
