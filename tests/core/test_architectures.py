"""Rebuilding a registered (non-Hugging Face) architecture at load: core imports no model.

The checkpoint names the class (``slimline.models.digits_cnn.DigitsCNN``); ``sl.load`` imports
the module that defines it — only under slimline's own packages — and that import registers
it. Nothing else is imported or run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import slimline as sl
from slimline.core.checkpoint import RECIPE_FILE


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return proc.stdout.strip()


def test_core_imports_no_model() -> None:
    out = _run("import sys, slimline.core.checkpoint, slimline.core.registry, "
               "slimline.core.calibration; print(any(m.startswith('slimline.models') "
               "for m in sys.modules))")
    assert out == "False"


def test_load_imports_the_defining_module_itself(tmp_path: Path) -> None:
    from slimline.models.digits_cnn import DigitsCNN

    sl.save(DigitsCNN(hidden=8), tmp_path / "cnn")
    out = _run(f"import slimline as sl; m = sl.load({str(tmp_path / 'cnn')!r}); "
               "print(type(m).__module__ + '.' + type(m).__name__)")
    assert out == "slimline.models.digits_cnn.DigitsCNN"


def test_a_class_outside_slimline_is_not_imported(tmp_path: Path) -> None:
    from slimline.models.digits_cnn import DigitsCNN

    path = sl.save(DigitsCNN(hidden=8), tmp_path / "cnn")
    manifest = json.loads((path / RECIPE_FILE).read_text())
    manifest["architecture"]["class"] = "this_module_does_not_exist_here.Net"
    (path / RECIPE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not registered"):
        sl.load(path)
    assert "this_module_does_not_exist_here" not in sys.modules
