"""slimline's own C libraries: found compiler, compiled once, cached by digest.

The hand-written kernels (``quantize/csrc``: the gemv kernels; ``compile/csrc``: the decode
step's small operations and unpad's varlen attention) are compiled at first use with the system
C compiler (``$CC``, else ``cc``) for AVX2 + FMA + F16C with OpenMP (wider instruction sets by
target attributes inside the sources), cached under the slimline cache
(``kernels/NAME-DIGEST.so``) by a digest of the sources, flags, compiler and machine, and
loaded with ctypes (:func:`load_library`). OpenMP resolves to the ``libgomp`` torch has
already loaded, so its threads are torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from slimline.models.cache import cache_root

_X86 = frozenset({"x86_64", "amd64"})
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def compiler() -> str | None:
    """The C compiler to build with (``$CC``, else ``cc``), or None when there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def build_library(compiler: str, name: str, sources: tuple[Path, ...],
                  headers: tuple[Path, ...] = ()) -> Path:
    """A shared library of ``sources`` compiled with :data:`FLAGS`, cached under the slimline
    cache (``kernels/NAME-DIGEST.so``) by a digest of the sources, the ``headers`` they
    include, flags, compiler and machine; compiled first if missing (atomic rename, so
    concurrent builds are safe)."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    digest = hashlib.sha256(
        b"".join(path.read_bytes() for path in (*sources, *headers)) + " ".join(FLAGS).encode()
        + version.encode() + platform.machine().encode()
    ).hexdigest()[:16]  # fmt: skip
    directory = cache_root() / "kernels"
    target = directory / f"{name}-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", tmp, *map(str, sources)], capture_output=True, text=True,
            check=True, timeout=300,
        )  # fmt: skip
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def load_library(what: str, name: str, sources: tuple[Path, ...],
                 headers: tuple[Path, ...] = ()) -> ctypes.CDLL | str:
    """The library of ``sources`` (:func:`build_library`) loaded with ctypes, or why it
    cannot be here, naming ``what`` it is and the fix: not x86, no AVX2 + FMA (the
    :data:`FLAGS`), no C compiler, or the build's own error (its last lines)."""
    if platform.machine().lower() not in _X86:
        return f"the {what} is x86 only (this CPU: {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the {what} needs AVX2 + FMA, which this CPU lacks"
    found = compiler()
    if found is None:
        return f"no C compiler to build the {what}: install gcc (or set $CC)"
    try:
        return ctypes.CDLL(str(build_library(found, name, sources, headers)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip().splitlines()[-3:]
        return f"building the {what} with {found} failed: " + " / ".join(detail)
