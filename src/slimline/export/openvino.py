"""Export a model to OpenVINO IR (``model.xml`` + ``model.bin``) and check it against torch.

OpenVINO converts a torch model two ways: by TorchScript tracing (``torchscript``, tried first:
two to four times faster to convert here) or from a ``torch.export`` program (``dynamo``,
tried when tracing fails or answers wrongly, as it did on transformers 5's BERT in the issue
this was written for). Whichever converts, the IR is written, read back, compiled for the
CPU in float32 and kept only when its outputs match the torch model on the example and on the
batches ``export/parity.py`` derives from it (another batch size and sequence length, one
token, left-padded), as the ONNX export is checked.

slimline's W8A8 layers (``int8_dynamic``, ``smoothquant``) are converted through their
standard-operator form (``export/lowering.py``): their int8 weights stay int8 constants in the
IR (OpenVINO runs the layers on weight-compressed GEMMs), activations are rounded to the
layer's grid by the torch kernel's own operations, and the parity is measured against the
torch model with its own int8 kernels. Packed weight-only layers (``rtn``,
``gptq``, ``awq``, ``hqq``) are refused by name before anything is written. A transformers
model is converted with its eager attention (see :func:`eager_attention`: OpenVINO's fused
attention answers NaN for a left-padded row where torch's answers zeros).

The model is converted in eval mode, its config and tokenizer files copied beside the IR, and
the directory written atomically (see ``export/graph.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
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
    write_atomically,
)
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

Exporter = Literal["auto", "dynamo", "torchscript"]
XML_FILE = "model.xml"
BIN_FILE = "model.bin"

# slimline layers whose arithmetic has no OpenVINO form here: their packed codes are read by
# aten kernels (_weight_int4pack_mm, _weight_int8pack_mm) the converter does not know.
UNCONVERTIBLE: dict[str, str] = {
    "QuantLinear": "its packed int4/int8 weights run on aten's int4pack/int8pack kernels, "
    "which OpenVINO's converter does not know",
}


def export_openvino(
    model: nn.Module,
    path: str | Path,
    example: object,
    *,
    exporter: Exporter = "auto",
    tokenizer: Any | None = None,
    atol: float = ATOL,
    min_cosine: float = MIN_COSINE,
) -> ExportReport:
    """Write ``model`` to the directory ``path`` as OpenVINO IR and check its parity.

    ``example``: one batch as ``sl.compress`` takes them; its first output is converted, with
    dynamic batch and sequence axes. ``exporter``: ``torchscript`` (tracing), ``dynamo``
    (``torch.export``, then ``openvino.convert_model``), or ``auto`` (the first of the two
    within parity). ``atol``, ``min_cosine``: the parity the IR must meet (see
    ``export/parity.py``'s ``Tolerance`` for why a W8A8 model needs a looser one). Raises
    ValueError before anything is written for what cannot be converted, and when no converter
    gives an IR within parity (with each one's reason).
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"export: exporter must be auto, dynamo or torchscript, got {exporter!r}")
    batch = check_example(example)
    tol = Tolerance(atol, min_cosine)
    check_convertible(model)
    _openvino()  # ImportError naming the extra, before any work
    def write(directory: Path) -> ExportReport:
        graph = GraphForward(model, batch).eval()
        check_eval(graph)
        # The references come from the model as it runs in torch (its own int8 kernels).
        examples, outputs = references(graph, parity_examples(batch))
        axes = dynamic_axes(graph, examples, outputs)
        check_lowering(model, lambda: graph(*tensors(examples[0])))
        with lowered(model) as swapped, eager_attention(model):
            tols, rounding = rounding_tolerances(graph, examples, outputs, tol,
                                                  lowered=bool(swapped))
            report = _write(graph, directory, examples, outputs, axes, exporter, tols,
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


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """A transformers model's attention as plain matmul + softmax inside the block.

    Where every key of a query is padding (the first positions of a left-padded row in a
    causal LM), torch's ``scaled_dot_product_attention`` answers zeros and OpenVINO's
    ``ScaledDotProductAttention`` NaN, which the next layer spreads to every real token of the
    row through its values. transformers' eager attention masks with the dtype's minimum
    instead of -inf, so such a row stays finite in both (OpenVINO fuses the pattern all the
    same). Other models are left as they are."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if current in (None, "eager") or not callable(switch):
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(current)


def check_convertible(model: nn.Module) -> None:
    """Raise ValueError naming the first layer (and why) that cannot be converted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls.__name__ in UNCONVERTIBLE:
                raise ValueError(
                    f"export: layer {name!r} ({type(module).__name__}) cannot be converted to "
                    f"OpenVINO: {UNCONVERTIBLE[cls.__name__]}; export the model before this "
                    "quantization step, or quantize with int8_dynamic or smoothquant, which "
                    "convert to int8"
                )


def _write(
    graph: GraphForward,
    directory: Path,
    examples: list[Batch],
    outputs: list[torch.Tensor],
    axes: dict[str, dict[int, str]],
    exporter: Exporter,
    tols: list[Tolerance],
    hint: str = "",
) -> ExportReport:
    """Try the converters in turn; keep the first IR within parity on every example."""
    attempts: dict[str, str] = {}
    for name in (["torchscript", "dynamo"] if exporter == "auto" else [exporter]):
        try:
            _convert_and_save(graph, directory, examples[0], axes, name)
            checks = _parity(directory / XML_FILE, examples, outputs, tols)
        except Exception as exc:  # a converter's failure is a reason to try the other one
            attempts[name] = reason(exc)
            clear(directory)
            continue
        if all(c.passed for c in checks):
            return ExportReport(directory, "openvino", name, list(graph.input_names),
                                [graph.output_name], axes, checks, False, [XML_FILE, BIN_FILE],
                                attempts, tolerance=loosest(tols))
        attempts[name] = "parity failed: " + "; ".join(
            f"max abs diff {c.max_abs_diff:.3g}, cosine {c.cosine:.6f} on {tuple(c.shape)}"
            for c in checks)
        clear(directory)
    raise ValueError("export: no converter gave an OpenVINO model faithful to the torch model: "
                     + "; ".join(f"{k}: {v}" for k, v in attempts.items()) + hint)


def _convert_and_save(
    graph: GraphForward, directory: Path, batch: Batch, axes: dict[str, dict[int, str]],
    exporter: str,
) -> None:
    """Convert ``graph`` with ``exporter``; name its inputs and output; save float32 IR."""
    ov = _openvino()
    args = tensors(batch)
    with warnings.catch_warnings():  # tracer and deprecation warnings: parity is the judge
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            # forward(*args): one entry, the varargs tuple, holding a spec per input.
            shapes = (tuple({a: torch.export.Dim.DYNAMIC for a in axes[n]}
                            for n in graph.input_names),)
            program = torch.export.export(graph, args, dynamic_shapes=shapes, strict=False)
            converted = ov.convert_model(program)
        else:
            sizes = [ov.PartialShape([-1 if i in axes[n] else s for i, s in enumerate(t.shape)])
                     for n, t in zip(graph.input_names, args, strict=True)]
            converted = ov.convert_model(graph, example_input=args, input=sizes)
    for port, name in zip(converted.inputs, graph.input_names, strict=True):
        port.get_tensor().set_names({name})
    converted.outputs[0].get_tensor().set_names({graph.output_name})
    # OpenVINO reads ``runtime_options`` as the model's own compile defaults: a user's plain
    # ``core.compile_model(path)`` keeps the graph's activation rounding (see compile_ir).
    converted.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    # float32 weights: ``compress_to_fp16`` (OpenVINO's default) would round them, and the
    # parity check would measure the rounding, not the conversion.
    ov.save_model(converted, str(directory / XML_FILE), compress_to_fp16=False)


def _parity(
    file: Path, examples: list[Batch], outputs: list[torch.Tensor], tols: list[Tolerance]
) -> list[ParityCheck]:
    """Read the saved IR back, compile it in float32 and compare with the torch outputs."""
    compiled = compile_ir(file)
    checks = []
    for batch, reference, tol in zip(examples, outputs, tols, strict=True):
        feeds = {n: t.numpy() for n, t in zip(input_names(batch), tensors(batch), strict=True)}
        out = compiled(feeds)[compiled.output(0)]
        checks.append(compare_batch(reference, torch.from_numpy(out), batch, tol))
    return checks


def compile_ir(file: Path, precision: str = "f32", threads: int | None = None) -> Any:
    """The IR at ``file`` compiled for the CPU. ``precision``: OpenVINO's inference precision
    hint; float32 by default, since on CPUs with bf16 units OpenVINO would otherwise run in
    bf16. ``threads``: its thread count (default: OpenVINO's).

    OpenVINO's own dynamic quantization is off: on CPUs with int8 dot-product units (VNNI,
    AMX) it re-quantizes the activations of fully connected layers in groups of its choosing,
    which for slimline's W8A8 graphs replaces the model's activation rounding with another
    (a two-layer int8_dynamic MLP: max abs 5.4e-3 from the torch kernels with it, 6e-7
    without; the int8 GEMMs the graph spells out still run in int8)."""
    ov = _openvino()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision,
                              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}  # also in the IR  # fmt: skip
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    check_compiles(file, config)
    core = ov.Core()
    return core.compile_model(core.read_model(str(file)), "CPU", config)


# Compiles the IR argv[1] with the JSON config argv[2], in a child process (check_compiles).
_PROBE = (
    "import json, sys, openvino as ov; core = ov.Core(); "
    "core.compile_model(core.read_model(sys.argv[1]), 'CPU', json.loads(sys.argv[2]))"
)


def check_compiles(file: Path, config: dict[str, Any]) -> None:
    """ValueError, not a dead process, where OpenVINO's CPU plugin is known to crash.

    OpenVINO 2026.4's CPU plugin dies with SIGFPE compiling a Llama-like graph in bf16 on one
    thread (measured on an AMX Xeon: code-llama-tiny, ``INFERENCE_PRECISION_HINT`` bf16 and
    ``INFERENCE_NUM_THREADS`` 1; float32, or two threads, compile; openvinotoolkit/openvino
    issue 33300 reports the same on one core). A signal cannot be caught in-process, so in
    that configuration — bf16 on one thread, or on a process pinned to one core — the IR is
    first compiled in a child process, and a child killed by a signal becomes this error,
    naming the ways around it. Other configurations compile directly (no extra cost). Only
    a kill by a signal is reported here: an ordinary failure raises again in-process."""
    threads = config.get("INFERENCE_NUM_THREADS") or len(os.sched_getaffinity(0))
    if str(config.get("INFERENCE_PRECISION_HINT", "")).lower() != "bf16" or threads != 1:
        return
    child = subprocess.run([sys.executable, "-c", _PROBE, str(file), json.dumps(config)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise ValueError(
            f"OpenVINO's CPU plugin crashed ({name}) compiling {file.name} in bf16 on one "
            f"thread (a known OpenVINO fault, openvinotoolkit/openvino#33300); use precision "
            f"f32, or give it two or more threads"
        )


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ImportError("OpenVINO export needs openvino: pip install 'slimline[openvino]'"
                          ) from None
    return openvino
