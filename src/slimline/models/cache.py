"""The on-disk cache of built-in models: where it lives and how a build lands in it atomically.

A build writes into a fresh temporary directory next to its final place and is renamed into
place only when it finished, so an interrupted build never leaves a half-written cache entry.
Entries are keyed by a recipe version string and a size, so changing a recipe rebuilds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "SLIMLINE_CACHE"
_COMPLETE = ".complete"  # written last inside the temp dir; a directory without it is ignored


def cache_root() -> Path:
    """``$SLIMLINE_CACHE``, else ``$XDG_CACHE_HOME/slimline``, else ``~/.cache/slimline``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "slimline"


def is_cached(key: str) -> bool:
    """Whether a finished cache entry named ``key`` exists."""
    return (cache_root() / key / _COMPLETE).is_file()


def cached_dir(key: str, build: Callable[[Path], None]) -> Path:
    """The directory of cache entry ``key``, calling ``build(tmp_dir)`` first if it is missing.

    ``build`` fills an empty temporary directory; it is then renamed to its final place. If
    another process finished the same entry first, that entry wins and ours is discarded.
    """
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"cache key {key!r} must be a plain, non-hidden directory name")
    root = cache_root()
    final = root / key
    if (final / _COMPLETE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text("ok\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is ordinary data
        if final.exists() and not (final / _COMPLETE).is_file():
            shutil.rmtree(final)  # a stale entry from an older layout; never a finished one
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _COMPLETE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
