"""The Python standard library's own ``.py`` files, and their split into train/validation/test.

Both text corpora of the built-in models (source code for ``code-llama-tiny``, docstring
sentences for ``minilm``) come from here, so they agree on which module belongs to which split.
A file's split is a pure function of its relative path (a SHA-256 hash), so it does not depend
on which other files exist or on the order they are listed in.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

Split: TypeAlias = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

# Percent of files per split (the rest is "test"): 90 / 5 / 5.
_TRAIN_PERCENT = 90
_VALIDATION_PERCENT = 5

# Directory names left out: tests and demos (not representative library code, partly
# deliberately broken), installed third-party packages, and generated tables (the
# ``encodings`` charmaps and ``pydoc_data/topics.py`` are machine-written and near-duplicates
# of each other, so they would make held-out perplexity look better than it is).
EXCLUDED_DIRS: frozenset[str] = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)


@dataclass(frozen=True)
class StdlibFile:
    """One module file: ``relpath`` (POSIX, relative to the stdlib root) and its split."""

    relpath: str
    path: Path
    split: Split

    def read_text(self) -> str:
        """The file's source; undecodable bytes are replaced rather than failing the build."""
        return self.path.read_bytes().decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_tag() -> str:
    """``py311`` for Python 3.11: the corpora differ between versions, so caches are keyed on it."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def split_of(relpath: str) -> Split:
    """The split of a module file, from a hash of its relative path (90 / 5 / 5)."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < _TRAIN_PERCENT:
        return "train"
    if bucket < _TRAIN_PERCENT + _VALIDATION_PERCENT:
        return "validation"
    return "test"


def stdlib_files(root: Path | None = None) -> list[StdlibFile]:
    """All kept ``.py`` files under ``root`` (default: :func:`stdlib_root`), sorted by path."""
    root = stdlib_root() if root is None else root
    if not root.is_dir():
        raise ValueError(f"standard library directory {root} does not exist")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        relpath = rel.as_posix()
        files.append(StdlibFile(relpath=relpath, path=path, split=split_of(relpath)))
    files.sort(key=lambda f: f.relpath)
    if not files:
        raise ValueError(f"no Python files found under {root}")
    return files


def files_by_split(
    files: list[StdlibFile], max_chars: dict[Split, int] | None = None
) -> dict[Split, list[StdlibFile]]:
    """Group ``files`` by split, keeping path order.

    With ``max_chars``, keep only a deterministic sample of each split: files are taken in the
    order of a hash of their path (a fixed shuffle) until the split's character budget is
    reached, then put back in path order. Small model variants use this to build in seconds.
    """
    out: dict[Split, list[StdlibFile]] = {s: [f for f in files if f.split == s] for s in SPLITS}
    if max_chars is None:
        return out
    for split in SPLITS:
        budget = max_chars.get(split)
        if budget is None:
            continue
        shuffled = sorted(out[split], key=lambda f: hashlib.sha256(f.relpath.encode()).digest())
        kept: list[StdlibFile] = []
        used = 0
        for f in shuffled:
            size = f.path.stat().st_size
            if used + size > budget and kept:
                continue
            kept.append(f)
            used += size
        out[split] = sorted(kept, key=lambda f: f.relpath)
    return out
