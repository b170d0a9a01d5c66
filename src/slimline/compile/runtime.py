"""``compile`` with ``backend: openvino | onnxruntime``: the forward run by a deployment runtime.

The model's call is replaced (as ``nn.Module.compile`` replaces it: its class, parameters and
``state_dict`` stay the eager model's, so it saves like any other) by a :class:`RuntimeCall`.
On the first call with a new input signature (input names, dtypes and ranks; sizes are
dynamic axes) the model is exported with ``sl.export``'s writer for that format — which
checks the graph against the eager model on that batch and the batches derived from it, and
raises if it is not faithful — and the batch, and every later one of that signature, is run
by onnxruntime or OpenVINO. The answer comes in the eager output's own type: a transformers
output holding its first field (``logits``, ``last_hidden_state``), a tuple, or the tensor.

With ``precision="bf16"`` (OpenVINO) the graph checked in float32 is then compiled for bf16
compute, and its answer on that first batch must keep a cosine of at least
:data:`BF16_MIN_COSINE` to the eager model's, or the call is refused.

Calls the graph cannot answer run the eager forward: in training mode (the graph is the eval
model's), or with arguments other than tensors and ``use_cache``/``return_dict`` (the cache
steps of ``generate``).

Why not ``torch.compile(backend="openvino")``: with torch 2.13 and OpenVINO 2026.4 it fails on a
tiny Llama in dynamo's guards (IndexError), and with ``aot_autograd`` its converter fails on
``aten.cat`` and it falls back, silently, to running eager. An export checked for parity runs
in OpenVINO or refuses, and converts slimline's W8A8 layers to int8 (``export/lowering.py``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.export.graph import first_output

RuntimeBackend = Literal["openvino", "onnxruntime"]
Precision = Literal["f32", "bf16"]
# The least cosine to the eager model of a graph run in bf16 (over the real tokens): bf16
# keeps 8 bits of mantissa; all-MiniLM-L6-v2 in OpenVINO bf16 lands at 0.99999.
BF16_MIN_COSINE = 0.999
# Keyword arguments that change nothing the graph computes (its output is the first tensor).
_IGNORED = {"use_cache": (False, None), "return_dict": (True, None)}
Signature = tuple[tuple[str, str, int], ...]


def check_runnable(model: nn.Module, backend: RuntimeBackend) -> None:
    """ValueError naming the first layer ``backend`` cannot run (and why); ImportError when
    its package is missing. Called by the handler, before the model is changed."""
    from slimline.compile.unpad import installed

    if installed(model):
        raise ValueError(f"compile.backend: {backend} runs one exported graph, whose shapes "
                         "cannot depend on the data as unpad's packed tokens do; use backend "
                         "inductor with unpad, or drop unpad")
    try:
        if backend == "onnxruntime":
            from slimline.export.onnx import check_exportable

            check_exportable(model)
            import onnxruntime  # noqa: F401
        else:
            from slimline.export.openvino import check_convertible

            check_convertible(model)
            import openvino  # noqa: F401
    except ValueError as exc:
        raise ValueError(f"compile.backend: {backend} cannot run this model: "
                         f"{str(exc).removeprefix('export: ')}") from None
    except ImportError:
        extra = "onnx" if backend == "onnxruntime" else "openvino"
        raise ImportError(f"compile.backend: {backend} needs pip install 'slimline[{extra}]'"
                          ) from None


class RuntimeCall:
    """The call of ``model`` run by ``backend``, one exported graph per input signature."""

    def __init__(self, model: nn.Module, backend: RuntimeBackend, precision: Precision = "f32"
                 ) -> None:  # fmt: skip
        self.model = model
        self.backend = backend
        self.precision = precision
        self.bf16_cosines: dict[Signature, float] = {}  # bf16 against eager, per signature
        self.graphs: dict[Signature, tuple[nn.Module, Callable[[torch.Tensor], Any]]] = {}
        self._dirs: list[tempfile.TemporaryDirectory[str]] = []  # removed with this object

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = graph_batch(args, kwargs)
        if batch is None or self.model.training:
            return self.model._call_impl(*args, **kwargs)
        key = signature(batch)
        if key not in self.graphs:
            self.graphs[key] = self._export(batch, args, kwargs)
        runner, wrap = self.graphs[key]
        out = runner(**batch) if isinstance(batch, Mapping) else runner(*_positional(batch))
        return wrap(first_output(out)[1])

    def _export(
        self, batch: Batch, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[nn.Module, Callable[[torch.Tensor], Any]]:
        from slimline.api import export
        from slimline.export.runtime import ExportedModel

        folder = tempfile.TemporaryDirectory(prefix="slimline-compile-")
        self._dirs.append(folder)
        target = Path(folder.name) / "graph"
        fmt: Literal["onnx", "openvino"] = "onnx" if self.backend == "onnxruntime" else "openvino"
        with _eager(self.model), torch.no_grad():
            eager = self.model(*args, **kwargs)
            export(self.model, target, format=fmt, example=batch)
        runner = ExportedModel(target, precision=self.precision)
        if self.precision != "f32":
            self.bf16_cosines[signature(batch)] = _check_bf16(runner, batch, eager)
        return runner, _wrapper(eager)


def _check_bf16(runner: nn.Module, batch: Batch, eager: Any) -> float:
    """The cosine of ``runner``'s bf16 answer on ``batch`` to the eager one; ValueError below
    :data:`BF16_MIN_COSINE`."""
    from slimline.export.parity import Tolerance, compare_batch

    with torch.no_grad():
        out = runner(**batch) if isinstance(batch, Mapping) else runner(*_positional(batch))
    check = compare_batch(first_output(eager)[1].float(), first_output(out)[1].float(), batch,
                          Tolerance(atol=float("inf"), min_cosine=BF16_MIN_COSINE))  # fmt: skip
    if not check.passed:
        raise ValueError(f"compile.precision: bf16 answers at cosine {check.cosine:.5f} of the "
                         f"eager model on the first batch (< {BF16_MIN_COSINE}); use precision "
                         "f32")  # fmt: skip
    return check.cosine


def graph_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Batch | None:
    """The call's tensors as a batch (keyword: a dict; positional: a tensor or tuple), or None
    when it has arguments the graph does not take."""
    extra = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    if any(k not in _IGNORED or v not in _IGNORED[k] for k, v in extra.items()):
        return None
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if (args and tensors) or not (args or tensors):
        return None
    if tensors:
        return tensors
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return args[0] if len(args) == 1 else tuple(args)


def signature(batch: Batch) -> Signature:
    """Input names, dtypes and ranks: what one exported graph with dynamic axes accepts."""
    items = batch.items() if isinstance(batch, Mapping) else enumerate(_positional(batch))
    return tuple((str(k), str(t.dtype), t.dim()) for k, t in items)


def _positional(batch: Batch) -> tuple[torch.Tensor, ...]:
    return (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)  # type: ignore[arg-type]


def _wrapper(eager: Any) -> Callable[[torch.Tensor], Any]:
    """How to give a graph's output tensor the eager output's form."""
    if isinstance(eager, torch.Tensor):
        return lambda t: t
    if isinstance(eager, Mapping):  # transformers' ModelOutput: a dataclass and a mapping
        name, cls = first_output(eager)[0], type(eager)
        return lambda t: cls(**{name: t})
    return lambda t: (t,)


@contextlib.contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    """The model's own forward inside the block (the exporters call it)."""
    compiled = model._compiled_call_impl
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def install(model: nn.Module, backend: RuntimeBackend, precision: Precision = "f32") -> None:
    """Route ``model``'s calls through a :class:`RuntimeCall` (checked first, see
    :func:`check_runnable`)."""
    check_runnable(model, backend)
    model._compiled_call_impl = RuntimeCall(model, backend, precision)
