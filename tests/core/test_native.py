"""slimline's C library builds: cached by a digest of what they compile, headers included."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from slimline.core import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")


def test_a_changed_header_builds_a_new_library(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path / "cache"))
    header = tmp_path / "value.h"
    source = tmp_path / "value.c"
    source.write_text('#include "value.h"\nint value(void) { return VALUE; }\n')
    compiler = native.compiler()
    assert compiler is not None
    built = {}
    for number in (3, 5):
        header.write_text(f"#define VALUE {number}\n")
        path = native.build_library(compiler, "value", (source,), (header,))
        built[number] = path
        assert ctypes.CDLL(str(path)).value() == number
    assert built[3] != built[5]  # a stale library would have answered 3 twice
    assert native.build_library(compiler, "value", (source,), (header,)) == built[5]  # cached
