"""Register slimline with transformers when, and only when, transformers loads its quantizers.

Importing ``transformers.quantizers.auto`` costs about half a second, as much again as
``import slimline``; most uses of slimline never need it. So ``import slimline`` only puts a
one-shot finder on ``sys.meta_path``: when that module is imported (which ``from_pretrained``
does), the registration runs right after the module's own code. If transformers' quantizers
were already imported, it runs at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

TARGET = "transformers.quantizers.auto"


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it loads."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register() -> None:
    # A transformers without the plugin API (or a broken one) leaves the directory refused by
    # the guard in config.json, which names slimline: never a half-registered quantizer.
    try:
        from slimline.integrations.transformers import register
    except (ImportError, AttributeError):
        return
    register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of :data:`TARGET` to register after it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _register()

        # Per-module loader instance: only this module's execution is wrapped.
        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
