"""The built-in models and their data, built locally and cached (no network at run time).

``load_builtin(name, size=...)`` returns a :class:`Builtin`: a fresh fp32 model in eval mode,
its tokenizer, its task and a ``batches(split, batch_size=..., limit=...)`` method. Nothing is
built at import; the first load of a model builds it into the cache (see
:func:`slimline.models.cache.cache_root`), later loads take seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

from slimline.models.builtin import Builtin, Task
from slimline.models.cache import cache_root
from slimline.models.digits_cnn import DigitsCNN

Size: TypeAlias = Literal["full", "small"]
BUILTIN_MODELS: tuple[str, ...] = ("code-llama-tiny", "minilm", "digits-cnn", "llama-1b-random")
SIZES: tuple[Size, ...] = ("full", "small")

__all__ = [
    "BUILTIN_MODELS",
    "SIZES",
    "Builtin",
    "DigitsCNN",
    "Size",
    "Task",
    "cache_root",
    "is_builtin",
    "load_builtin",
]


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of :data:`BUILTIN_MODELS`."""
    return isinstance(name, str) and name in BUILTIN_MODELS


def load_builtin(name: str, *, size: Size = "full") -> Builtin:
    """Load a built-in model (building it into the cache first if needed).

    ``size="small"`` is a much smaller variant for tests where one exists (``code-llama-tiny``,
    ``llama-1b-random``; ``minilm`` keeps its model and samples fewer sentences; ``digits-cnn``
    has one size).
    Raises ``ValueError`` for an unknown name or size.
    """
    if not is_builtin(name):
        raise ValueError(
            f"unknown built-in model {name!r}; valid names: {', '.join(BUILTIN_MODELS)}"
        )
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return _LOADERS[name](size)


def _load_code_llama(size: Size) -> Builtin:
    from slimline.models.code_llama import load_code_llama

    return load_code_llama(size)


def _load_minilm(size: Size) -> Builtin:
    from slimline.models.minilm import load_minilm

    return load_minilm(size)


def _load_digits_cnn(size: Size) -> Builtin:
    from slimline.models.digits_cnn import load_digits_cnn

    return load_digits_cnn()


def _load_llama_random(size: Size) -> Builtin:
    from slimline.models.llama_random import load_llama_random

    return load_llama_random(size)


# Heavy imports (transformers, tokenizers, scikit-learn) happen inside the loaders.
_LOADERS: dict[str, Callable[[Size], Builtin]] = {
    "code-llama-tiny": _load_code_llama,
    "minilm": _load_minilm,
    "digits-cnn": _load_digits_cnn,
    "llama-1b-random": _load_llama_random,
}
