"""``slimline.evaluate`` is both the subpackage and the API function ``sl.evaluate``.

Each order of first imports runs in a fresh interpreter, since the binding of a subpackage to
its parent's attribute happens only on the first import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = """
import inspect
import torch
import slimline as sl
import slimline.evaluate
from slimline.api import evaluate as api_evaluate
from slimline.evaluate import Report, metrics
assert slimline.evaluate is sl.evaluate
assert slimline.evaluate.metrics is metrics and slimline.evaluate.Report is Report
assert inspect.signature(sl.evaluate) == inspect.signature(api_evaluate)
for _ in range(2):  # the first call imports more of slimline.evaluate
    report = sl.evaluate(torch.nn.Linear(4, 2), data=[torch.randn(3, 4)], metrics=["size"])
    assert report["models"]["model"]["params"] == 4 * 2 + 2, report
print("ok")
"""

_FIRST_IMPORTS = {
    "package first": "import slimline",
    "subpackage first": "import slimline.evaluate",
    "submodule first": "import slimline.evaluate.metrics as M",
    "from-import first": "from slimline.evaluate import Report",
    "api first": "from slimline.api import evaluate",
}


@pytest.mark.parametrize("first", list(_FIRST_IMPORTS))
def test_package_and_function_both_work_whatever_is_imported_first(first: str) -> None:
    script = _FIRST_IMPORTS[first] + "\n" + _CHECK
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
