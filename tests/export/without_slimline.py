"""Run Python code in a child process that cannot import slimline.

The editable install puts ``src/`` on ``sys.path`` through a ``.pth`` file; ``-I`` keeps the
working directory and ``PYTHONPATH`` off the path, and the child drops every entry holding a
``slimline`` package before running ``code`` — as on a machine where only transformers (and
sentence-transformers) are installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_PRELUDE = """
import importlib.util, json, os, sys
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p, 'slimline', '__init__.py'))]
assert importlib.util.find_spec('slimline') is None, 'slimline is still importable'
"""


def run_without_slimline(code: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``code`` (which prints one JSON object as its last line) with ``args`` as argv."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", _PRELUDE + code, *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# Loads argv[1] with the class named in argv[2] (``transformers.X`` or a sentence-transformers
# class) and reports the error, or writes the outputs for argv[3]'s inputs to argv[4].
LOAD_CODE = """
def load(path, kind):
    if kind == 'SentenceTransformer':
        from sentence_transformers import SentenceTransformer
        return SentenceTransformer(path, device='cpu')
    import transformers
    return getattr(transformers, kind).from_pretrained(path)

try:
    model = load(sys.argv[1], sys.argv[2])
except Exception as exc:
    print(json.dumps({'loaded': False, 'error': type(exc).__name__, 'message': str(exc)}))
    sys.exit(0)
if len(sys.argv) > 4:
    import torch
    from safetensors.torch import load_file, save_file
    inputs = load_file(sys.argv[3])
    with torch.no_grad():
        save_file({'logits': model(**inputs).logits.contiguous()}, sys.argv[4])
print(json.dumps({'loaded': True}))
"""
