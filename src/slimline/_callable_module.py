"""A module that can be called like a function (for ``sl.evaluate``, see ``slimline/__init__``).

Python binds a subpackage to its parent's attribute when first imported, so a function of the
same name on the parent is replaced by the module (or replaces it) depending on import order.
Giving the module a ``__call__`` removes the conflict instead of ordering around it.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any


class _CallableModule(types.ModuleType):
    """A module whose call is the function stored as ``__wrapped__`` (so that
    ``inspect.signature`` and ``help`` show the function's signature)."""

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def make_callable(name: str, function: Callable[..., Any]) -> types.ModuleType:
    """Import module ``name`` and make calling it call ``function``; returns the module."""
    module = importlib.import_module(name)
    module.__class__ = _CallableModule
    module.__wrapped__ = function  # type: ignore[attr-defined]
    return module
