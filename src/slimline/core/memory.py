"""Hand memory the process has freed back to the operating system.

glibc's allocator keeps freed blocks below its mmap threshold in the heap (the threshold grows
to 32 MiB once a block of that size is freed), so a long block-by-block job — calibrating or
quantizing a model layer after layer — leaves its resident set at the high-water mark of
every earlier step instead of what it still holds. ``malloc_trim`` returns the free pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return trim


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``; nothing where the C
    library has no such call, e.g. macOS or musl).

    No garbage collection here: a forced ``gc.collect()`` inside a forked worker (a torch
    distributed rank started with ``fork``) ran finalizers of objects inherited from the parent
    that wait on threads the child does not have, and the ranks hung.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
