"""Export a model to ONNX, run it with onnxruntime and check it against the torch model.

``torch.onnx.export`` has two exporters: TorchScript tracing (``dynamo=False``, fast, the first
tried) and ``torch.export`` (``dynamo=True``, tried when tracing fails or answers wrongly — it
has wrong-output bugs of its own). Whichever writes the graph, it is kept only when
onnxruntime's outputs match the torch model on the example *and* on the batches
``export/parity.py`` derives from it: another batch size and sequence length (which proves the
dynamic axes), one token, and a left-padded batch.

slimline's W8A8 layers (``int8_dynamic``, ``smoothquant``) are written in integer form
(``export/lowering.py``): activations rounded to the layer's uint8 grid by the torch kernel's
own operations, then ONNX's ``MatMulInteger`` with the int8 weight, which onnxruntime runs as an
int8 GEMM; the parity is measured against the torch model with its own int8 kernels, each
layer first checked against its kernel on the same input. Packed weight-only layers are
refused by name before anything is written.

The model is exported in eval mode (a module left in training mode keeps dropout on in the
graph), with its config, tokenizer and sentence-transformers files beside it. The directory is
written atomically, as ``sl.save`` writes checkpoints: nothing is left behind by a refusal or
a failure, and an existing export is replaced only by a complete one.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.export.graph import (
    GraphForward,
    check_eval,
    check_example,
    clear,
    companions,
    describe_source,
    dynamic_axes,
    eval_mode,
    input_names,
    reason,
    references,
    tensors,
    weight_bytes,
    write_atomically,
)
from slimline.export.integer_ops import dynamo_translations
from slimline.export.lowering import (
    ROUNDING_HINT,
    check_lowering,
    lowered,
    rounding_tolerances,
)
from slimline.export.parity import (
    ATOL,
    MIN_COSINE,
    ParityCheck,
    Tolerance,
    compare_batch,
    loosest,
    parity_examples,
)
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
}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: object,
    *,
    exporter: Exporter = "auto",
    external_data: bool | None = None,
    tokenizer: Any | None = None,
    atol: float = ATOL,
    min_cosine: float = MIN_COSINE,
) -> ExportReport:
    """Write ``model`` to the directory ``path`` as ``model.onnx`` and check its parity.

    ``example``: one batch as ``sl.compress`` takes them (dict of tensors, tensor or tuple);
    its first output (logits, last hidden state, or the tensor returned) is exported, with
    dynamic batch and sequence axes. ``external_data``: keep the weights in
    ``model.onnx.data`` (default: only past the 2 GiB protobuf limit). ``atol``,
    ``min_cosine``: the parity the graph must meet (``export/parity.py``). Raises ValueError
    before anything is written for what cannot be exported, and when no exporter writes a
    graph within parity (the reasons of each are in the message).
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"export: exporter must be auto, torchscript or dynamo, got {exporter!r}")
    batch = check_example(example)
    tol = Tolerance(atol, min_cosine)
    check_exportable(model)
    external = external_data if external_data is not None else weight_bytes(model) > PROTOBUF_LIMIT
    def write(directory: Path) -> ExportReport:
        graph = GraphForward(model, batch).eval()
        check_eval(graph)
        # The references come from the model as it runs in torch (its own int8 kernels).
        examples, outputs = references(graph, parity_examples(batch))
        axes = dynamic_axes(graph, examples, outputs)
        check_lowering(model, lambda: graph(*tensors(examples[0])), integer=True)
        with lowered(model, integer=True) as swapped:
            tols, rounding = rounding_tolerances(graph, examples, outputs, tol,
                                                 lowered=bool(swapped))
            report = _write(graph, directory, examples, outputs, axes, exporter, external, tols,
                            hint=ROUNDING_HINT if swapped else "")
        report.lowered = swapped
        if rounding:
            report.details["w8a8_rounding"] = rounding
        report.files = companions(model, directory, tokenizer) + report.files
        report.path = Path(path)
        describe_source(report, model)
        report.write(directory)
        return report

    with eval_mode(model):
        return write_atomically(path, write)


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


def _write(
    graph: GraphForward,
    directory: Path,
    examples: list[Batch],
    outputs: list[torch.Tensor],
    axes: dict[str, dict[int, str]],
    exporter: Exporter,
    external: bool,
    tols: list[Tolerance],
    hint: str = "",
) -> ExportReport:
    """Try the exporters in turn; keep the first graph within parity on every example."""
    attempts: dict[str, str] = {}
    for name in (["torchscript", "dynamo"] if exporter == "auto" else [exporter]):
        try:
            _export_graph(graph, directory, examples[0], axes, dynamo=name == "dynamo",
                          external=external)
            checks, inputs = _parity(directory / MODEL_FILE, examples, outputs, tols)
        except Exception as exc:  # an exporter's failure is a reason to try the other one
            attempts[name] = reason(exc)
            clear(directory)
            continue
        if all(c.passed for c in checks):
            files = [MODEL_FILE] + ([DATA_FILE] if (directory / DATA_FILE).is_file() else [])
            return ExportReport(directory, "onnx", name, inputs, [graph.output_name], axes,
                                checks, external, files, attempts, tolerance=loosest(tols))
        attempts[name] = "parity failed: " + "; ".join(
            f"max abs diff {c.max_abs_diff:.3g}, cosine {c.cosine:.6f} on {tuple(c.shape)}"
            for c in checks)
        clear(directory)
    raise ValueError("export: no ONNX exporter wrote a graph faithful to the model: "
                     + "; ".join(f"{k}: {v}" for k, v in attempts.items()) + hint)


def _export_graph(
    graph: GraphForward, directory: Path, batch: Batch, axes: dict[str, dict[int, str]], *,
    dynamo: bool, external: bool,
) -> None:
    """Export to a scratch folder, then store it as ``model.onnx`` (+ ``.data`` if external)."""
    import onnx

    args = tensors(batch)
    scratch = directory / ".scratch"
    scratch.mkdir()
    kwargs: dict[str, Any] = {"dynamic_axes": axes}
    if dynamo:
        # forward(*tensors): one entry, the varargs tuple, holding a spec per input.
        kwargs = {"dynamic_shapes": (tuple({a: torch.export.Dim.DYNAMIC for a in axes[n]}
                                           for n in graph.input_names),),
                  "custom_translation_table": dynamo_translations()}  # W8A8: MatMulInteger
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
    file: Path, examples: list[Batch], outputs: list[torch.Tensor], tols: list[Tolerance]
) -> tuple[list[ParityCheck], list[str]]:
    """Run ``file`` with onnxruntime on each example; compare with the torch outputs."""
    session = onnx_session(file)
    names = [i.name for i in session.get_inputs()]
    checks = []
    for batch, reference, tol in zip(examples, outputs, tols, strict=True):
        feeds = dict(zip(input_names(batch), tensors(batch), strict=True))
        out = session.run(None, {n: feeds[n].numpy() for n in names})[0]
        checks.append(compare_batch(reference, torch.from_numpy(out), batch, tol))
    return checks, names


def onnx_session(file: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``file`` (ImportError naming the extra if missing);
    ``threads``: its intra-op thread count (default: onnxruntime's)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX export needs onnxruntime: pip install 'slimline[onnx]'") from None
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
