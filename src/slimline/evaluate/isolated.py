"""Peak memory of one model in a process of its own.

Two models in one process share its resident-set high-water mark, so measuring both there
gives the process's working memory, not what each model costs (MEASURING.md, "Memory"). Here
each model, saved with ``slimline.save``, is loaded with ``slimline.load`` by a fresh Python
process (nothing pickled: safetensors + JSON), which runs the batch and reports:

* ``before``: its resident set after importing what loading needs, before loading;
* ``peak``: its resident-set high-water mark over ``repeats`` forwards of the batch, reset
  after one warm-up forward (``VmHWM`` after ``/proc/self/clear_refs``; the lifetime peak from
  ``getrusage`` where the mark cannot be reset, then loading counts too); on CUDA, the peak
  of ``torch.cuda.max_memory_allocated``;
* the model's own figure, ``peak - before``: its weights as loaded, what its kernels derive
  from them, and the working memory of its forward.

Run as ``python -m slimline.evaluate.isolated --checkpoint DIR --batch FILE --out FILE``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimline.core.batches import Batch

REPEATS = 3  # forwards measured after the warm-up; the peak is their maximum
TIMEOUT_S = 900.0  # a compiled model compiles again in the child


class NotIsolated(RuntimeError):
    """A model that cannot be measured in a process of its own; the message says why."""


@dataclass(frozen=True)
class OwnPeak:
    """What the child process measured, in bytes."""

    model_bytes: int  # peak - before: the model's own cost
    process_bytes: int  # the child's peak, interpreter and libraries included
    before_bytes: int  # the child's memory before loading the model
    method: str


@dataclass
class Child:
    """A started measurement; :meth:`result` waits for it."""

    process: subprocess.Popen[str]
    out: Path
    name: str

    def result(self, timeout: float = TIMEOUT_S) -> OwnPeak:
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise NotIsolated(
                f"{self.name!r}: the child process took over {timeout:.0f} s") from None
        if self.process.returncode != 0 or not self.out.is_file():
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise NotIsolated(f"{self.name!r}: the child process failed: {last}")
        return OwnPeak(**json.loads(self.out.read_text()))

    def stop(self) -> None:
        """End the process if it still runs (an error elsewhere, or Ctrl-C)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def measure_all(
    models: Mapping[str, nn.Module], checkpoint: Callable[[str], Path], batch: Batch, *,
    devices: Mapping[str, torch.device], threads: int, workdir: Path,
) -> dict[str, OwnPeak]:
    """Each model's peak, its child processes running side by side (each has its own mark).

    ``checkpoint(name)`` gives the directory ``slimline.save`` wrote for the model (or raises
    what ``save`` raised). NotIsolated if any model cannot be measured this way.
    """
    children: list[Child] = []
    try:
        for name, model in models.items():
            try:
                saved = checkpoint(name)
            except Exception as error:
                raise NotIsolated(f"{name!r} cannot be saved: {type(error).__name__}: "
                                  f"{error}") from None
            children.append(start(name, saved, model, batch, device=devices[name],
                                  threads=threads, workdir=workdir))
        return {child.name: child.result() for child in children}
    finally:
        for child in children:
            child.stop()


def describe(peak: OwnPeak) -> str:
    """The report's ``methods["memory"]`` for figures measured here."""
    return (f"each model saved with slimline.save and loaded by a fresh Python process of "
            f"its own; {peak.method}; peak over {REPEATS} forwards of the first batch after "
            "one warm-up forward. peak_memory_bytes: that peak less the process's memory "
            "before loading (interpreter and libraries); peak_memory_bytes_process: the "
            "whole process's peak")


def start(
    name: str, checkpoint: Path, model: nn.Module, batch: Batch, *, device: torch.device,
    threads: int, workdir: Path, repeats: int = REPEATS,
) -> Child:
    """Start measuring the model saved at ``checkpoint`` (``model`` is its live original)."""
    imports = _modules_to_import(checkpoint, model)
    workdir.mkdir(parents=True, exist_ok=True)
    batch_file, out = workdir / f"{name}.batch.safetensors", workdir / f"{name}.peak.json"
    write_batch(batch, batch_file)
    command = [
        sys.executable, "-m", __name__, "--checkpoint", str(checkpoint), "--batch",
        str(batch_file), "--out", str(out), "--device", str(device), "--threads", str(threads),
        "--repeats", str(repeats), *(arg for module in imports for arg in ("--import", module)),
    ]  # fmt: skip
    # The parent's import path, so the child finds what the parent imported.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env)
    return Child(process, out, name)


def _modules_to_import(checkpoint: Path, model: nn.Module) -> list[str]:
    """The module defining a registered user architecture; NotIsolated if none can rebuild it."""
    from slimline.core.checkpoint import read_manifest
    from slimline.export.runtime import is_exported

    if is_exported(checkpoint):  # an exported model: the child opens it with its runtime
        return []
    arch = read_manifest(checkpoint)["architecture"]
    module = type(model).__module__
    if arch["kind"] == "user":
        raise NotIsolated(f"{type(model).__name__} is a plain nn.Module class that sl.load "
                          "cannot rebuild (register_architecture, or a Hugging Face model, can)")
    if arch["kind"] == "registered" and not module.startswith("slimline."):
        if module == "__main__":
            raise NotIsolated(f"{type(model).__name__} is defined in __main__, which a child "
                              "process cannot import")
        return [module]
    return []


# --- the batch, as safetensors ------------------------------------------------------------

_KIND = "kind"  # metadata key: "mapping" (keyword arguments), "tensor" or "sequence"


def write_batch(batch: Batch, path: Path) -> None:
    """Write a batch (dict, tensor or sequence of tensors) as a safetensors file."""
    from safetensors.torch import save_file

    if isinstance(batch, torch.Tensor):
        kind, tensors = "tensor", {"0": batch}
    elif isinstance(batch, Mapping):
        kind, tensors = "mapping", dict(batch)
    else:
        kind, tensors = "sequence", {str(i): t for i, t in enumerate(batch)}
    plain = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
    save_file(plain, str(path), metadata={_KIND: kind})


def read_batch(path: Path) -> Batch:
    """The batch :func:`write_batch` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        kind = (file.metadata() or {}).get(_KIND)
        tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
    if kind == "mapping":
        return tensors
    ordered = [tensors[str(i)] for i in range(len(tensors))]
    return ordered[0] if kind == "tensor" else tuple(ordered)


# --- the child process ----------------------------------------------------------------------


def measure_here(
    checkpoint: Path, batch: Batch, device: torch.device, repeats: int
) -> dict[str, Any]:
    """In the child: load, warm up, then the peak over ``repeats`` forwards (OwnPeak fields)."""
    from slimline.core.batches import forward, to_device
    from slimline.core.checkpoint import load
    from slimline.evaluate import bench
    from slimline.export.runtime import ExportedModel, is_exported

    batch = to_device(batch, device)
    gc.collect()
    before = _memory_now(device)
    model = ExportedModel(checkpoint) if is_exported(checkpoint) else load(checkpoint).to(device)
    with torch.inference_mode():
        forward(model, batch)  # first-call work: derived kernel layouts, lazy allocations

        def run() -> None:
            for _ in range(repeats):
                forward(model, batch)

        peak = bench.peak_memory_during(run, device)
    return {"model_bytes": peak.bytes - before, "process_bytes": peak.bytes,
            "before_bytes": before, "method": peak.method}


def _memory_now(device: torch.device) -> int:
    from slimline.evaluate import bench

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return bench.current_rss()


def _import_what_loading_needs(checkpoint: Path, extra: Sequence[str]) -> None:
    """Import the libraries ``load`` will use, so their memory counts in ``before``."""
    import importlib

    from slimline.core.checkpoint import read_manifest
    from slimline.core.modules import module_type
    from slimline.export.runtime import import_runtime, is_exported

    if is_exported(checkpoint):
        import_runtime(checkpoint)
        return
    manifest = read_manifest(checkpoint)
    for entry in manifest["modules"].values():
        module_type(entry["type"])
    importlib.import_module("slimline.models")
    importlib.import_module("safetensors.torch")
    for module in extra:
        importlib.import_module(module)
    if manifest["architecture"]["kind"] == "huggingface":
        import transformers

        getattr(transformers, manifest["architecture"]["class"], None)
        getattr(transformers, "AutoConfig", None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--import", dest="imports", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _import_what_loading_needs(args.checkpoint, args.imports)
    found = measure_here(args.checkpoint, read_batch(args.batch), torch.device(args.device),
                         args.repeats)
    args.out.write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
