"""Export a model to ONNX, run it with onnxruntime and check it against the torch model.

``torch.onnx.export`` has two exporters: TorchScript tracing (``dynamo=False``, fast, the first
tried) and ``torch.export`` (``dynamo=True``, tried when tracing fails or answers wrongly — it
has wrong-output bugs of its own). Whichever writes the graph, it is kept only when
onnxruntime's outputs match the torch model on the example *and* on a second batch of another
batch size and sequence length (``export/parity.py``), which proves the dynamic axes.

The model is exported in eval mode (a module left in training mode keeps dropout on in the
graph), with its config, tokenizer and sentence-transformers files beside it. The directory is
written atomically, as ``sl.save`` writes checkpoints: nothing is left behind by a refusal or
a failure, and an existing export is replaced only by a complete one.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimline.core.batches import Batch, check_batch, split_labels
from slimline.export.parity import ParityCheck, compare, is_sequence, second_example
from slimline.export.report import ExportReport

Exporter = Literal["auto", "torchscript", "dynamo"]
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
# A protobuf message cannot exceed 2 GiB: larger models keep their weights in DATA_FILE.
PROTOBUF_LIMIT = 2 * 1024**3

# slimline layers whose forward runs CPU kernels no exporter lowers to ONNX (torch 2.13,
# onnxscript 0.7): tracing fails on them, torch.export cannot convert them.
UNEXPORTABLE: dict[str, str] = {
    "QuantLinear": "packed int4/int8 weights run by aten's int4pack/int8pack kernels",
    "Int8DynamicLinear": "its oneDNN int8 GEMM (slimline::onednn_int8_mm) has no ONNX form",
    "SmoothQuantLinear": "its oneDNN int8 GEMM (slimline::onednn_int8_mm) has no ONNX form",
}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: object,
    *,
    exporter: Exporter = "auto",
    external_data: bool | None = None,
    tokenizer: Any | None = None,
) -> ExportReport:
    """Write ``model`` to the directory ``path`` as ``model.onnx`` and check its parity.

    ``example``: one batch as ``sl.compress`` takes them (dict of tensors, tensor or tuple);
    its first output (logits, last hidden state, or the tensor returned) is exported, with
    dynamic batch and sequence axes. ``external_data``: keep the weights in
    ``model.onnx.data`` (default: only past the 2 GiB protobuf limit). Raises ValueError
    before anything is written for what cannot be exported, and when no exporter writes a
    graph within parity (the reasons of each are in the message).
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"export: exporter must be auto, torchscript or dynamo, got {exporter!r}")
    batch, _ = split_labels(check_batch(example, where="export: example"))
    check_exportable(model)
    target = _target(path)
    external = external_data if external_data is not None else _weight_bytes(model) > PROTOBUF_LIMIT
    with eval_mode(model):
        graph = _Forward(model, batch).eval()
        _check_eval(graph)
        examples = [batch, second_example(batch)]
        with torch.no_grad():
            references = [graph(*_tensors(b)) for b in examples]
        axes = _dynamic_axes(graph, examples, references)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            report = _write(graph, tmp, examples, references, axes, exporter, external)
            report.files = _companions(model, tmp, tokenizer) + report.files
            report.path = target
            report.write(tmp)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return report


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError naming the first layer (and why) that cannot be exported to ONNX."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls.__name__ in UNEXPORTABLE:
                raise ValueError(
                    f"export: layer {name!r} ({type(module).__name__}) cannot be exported to "
                    f"ONNX: {UNEXPORTABLE[cls.__name__]}; export the model before this "
                    "quantization step (or use a step that keeps nn.Linear, such as fp8 or svd)"
                )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype == torch.bfloat16:
            raise ValueError(
                f"export: weight {name!r} is bfloat16, which onnxruntime's CPU provider cannot "
                "run (no bfloat16 MatMul); export the float32 model"
            )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode inside the block; their modes restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _check_eval(graph: nn.Module) -> None:
    left = [name or "<model>" for name, m in graph.named_modules() if m.training]
    if left:
        raise RuntimeError(f"export: modules still in training mode after eval(): {left[:5]}")


class _Forward(nn.Module):
    """``model`` called with the example's inputs as positional tensors, returning its first
    output tensor: the one-tensor-in, one-tensor-out form both exporters and ONNX name."""

    def __init__(self, model: nn.Module, batch: Batch) -> None:
        super().__init__()
        self.model = model
        self.keys = list(batch) if isinstance(batch, Mapping) else None
        self.input_names = input_names(batch)
        # A language model would also build and return its KV cache: not part of the graph.
        self.extra = {"use_cache": False} if self.keys and _takes(model, "use_cache") else {}
        self.output_name = "output"

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.keys is None:
            out = self.model(*tensors)
        else:
            out = self.model(**dict(zip(self.keys, tensors, strict=True)), **self.extra)
        name, tensor = _first_output(out)
        self.output_name = name
        return tensor


def _first_output(output: Any) -> tuple[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return "output", output
    if isinstance(output, Mapping):  # transformers' ModelOutput is an ordered mapping
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                return str(key), value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return "output", output[0]
    raise TypeError(f"export: cannot find an output tensor in a {type(output).__name__}")


def _takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _tensors(batch: Batch) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        return tuple(batch.values())
    return tuple(batch)


def _dynamic_axes(
    graph: _Forward, examples: list[Batch], outputs: list[torch.Tensor]
) -> dict[str, dict[int, str]]:
    """Batch (axis 0) of every input, sequence (axis 1) of token inputs; an output's axes are
    those whose size changed between the two examples."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(graph.input_names, _tensors(examples[0]), strict=True):
        axes[name] = {0: "batch", 1: "sequence"} if is_sequence(t) else {0: "batch"}
    sizes = zip(outputs[0].shape, outputs[1].shape, strict=True)
    axes[graph.output_name] = {i: "batch" if i == 0 else "sequence"
                               for i, (a, b) in enumerate(sizes) if a != b}
    return axes


def _write(
    graph: _Forward,
    directory: Path,
    examples: list[Batch],
    references: list[torch.Tensor],
    axes: dict[str, dict[int, str]],
    exporter: Exporter,
    external: bool,
) -> ExportReport:
    """Try the exporters in turn; keep the first graph within parity on both examples."""
    attempts: dict[str, str] = {}
    for name in (["torchscript", "dynamo"] if exporter == "auto" else [exporter]):
        try:
            _export_graph(graph, directory, examples[0], axes, dynamo=name == "dynamo",
                          external=external)
            checks, inputs = _parity(directory / MODEL_FILE, examples, references)
        except Exception as exc:  # an exporter's failure is a reason to try the other one
            attempts[name] = _reason(exc)
            _clear(directory)
            continue
        if all(c.passed for c in checks):
            files = [MODEL_FILE] + ([DATA_FILE] if (directory / DATA_FILE).is_file() else [])
            return ExportReport(directory, "onnx", name, inputs, [graph.output_name], axes,
                                checks, external, files, attempts)
        attempts[name] = "parity failed: " + "; ".join(
            f"max abs diff {c.max_abs_diff:.3g}, cosine {c.cosine:.6f} on {tuple(c.shape)}"
            for c in checks)
        _clear(directory)
    raise ValueError("export: no ONNX exporter wrote a graph faithful to the model: "
                     + "; ".join(f"{k}: {v}" for k, v in attempts.items()))


def _reason(exc: BaseException) -> str:
    """The root cause of an exporter's failure, on one short line (its wrappers only say
    which export stage failed)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _export_graph(
    graph: _Forward, directory: Path, batch: Batch, axes: dict[str, dict[int, str]], *,
    dynamo: bool, external: bool,
) -> None:
    """Export to a scratch folder, then store it as ``model.onnx`` (+ ``.data`` if external)."""
    import onnx

    args = _tensors(batch)
    scratch = directory / ".scratch"
    scratch.mkdir()
    kwargs: dict[str, Any] = {"dynamic_axes": axes}
    if dynamo:
        # forward(*tensors): one entry, the varargs tuple, holding a spec per input.
        kwargs = {"dynamic_shapes": (tuple({a: torch.export.Dim.DYNAMIC for a in axes[n]}
                                           for n in graph.input_names),)}
    with warnings.catch_warnings():  # tracer warnings: the parity check is the judge
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(scratch / MODEL_FILE), input_names=graph.input_names,
                          output_names=[graph.output_name], dynamo=dynamo, verbose=False,
                          **kwargs)
    proto = onnx.load(str(scratch / MODEL_FILE))
    onnx.save_model(proto, str(directory / MODEL_FILE), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=DATA_FILE)  # small ones inline:
    # onnxruntime reads shape constants (Slice bounds) only from the graph itself.
    shutil.rmtree(scratch)


def _parity(
    file: Path, examples: list[Batch], references: list[torch.Tensor]
) -> tuple[list[ParityCheck], list[str]]:
    """Run ``file`` with onnxruntime on each example; compare with the torch outputs."""
    session = onnx_session(file)
    names = [i.name for i in session.get_inputs()]
    checks = []
    for batch, reference in zip(examples, references, strict=True):
        feeds = dict(zip(input_names(batch), _tensors(batch), strict=True))
        out = session.run(None, {n: feeds[n].numpy() for n in names})[0]
        checks.append(compare(reference, torch.from_numpy(out), list(_tensors(batch)[0].shape)))
    return checks, names


def input_names(batch: Batch) -> list[str]:
    """The graph's input names: a dict batch's keys, else ``input`` or ``input_0``, ..."""
    if isinstance(batch, Mapping):
        return list(batch)
    if isinstance(batch, torch.Tensor):
        return ["input"]
    return [f"input_{i}" for i in range(len(batch))]


def onnx_session(file: Path) -> Any:
    """An onnxruntime CPU session for ``file`` (ImportError naming the extra if missing)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX export needs onnxruntime: pip install 'slimline[onnx]'") from None
    return onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _companions(model: nn.Module, directory: Path, tokenizer: Any | None) -> list[str]:
    """The config, and the source's tokenizer and sentence-transformers files (not weights)."""
    from slimline.core.checkpoint import SOURCE_DIR_ATTR
    from slimline.export.source_files import copy_source_files

    copied: list[str] = []
    source = getattr(model, SOURCE_DIR_ATTR, None)
    if source is not None and Path(source).is_dir():
        copied += copy_source_files(Path(source), directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
        copied.append("tokenizer")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(directory / "config.json"))
        copied.append("config.json")
    return copied


def _weight_bytes(model: nn.Module) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size()
            for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def _target(path: str | Path) -> Path:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"export: {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _replace_dir(tmp: Path, target: Path) -> None:
    from slimline.core.checkpoint import _replace_dir as replace

    replace(tmp, target)
