"""What every exporter shares: the model as a tensors-in, tensor-out graph, and the directory.

:class:`GraphForward` wraps a model as the exporters (``torch.onnx.export``, ``torch.export``,
OpenVINO's converter) want it: positional tensors in, the first output tensor out, eval mode,
no KV cache. A left-padded batch is computed as ``slimline.core.batches.forward`` computes it
(and ``generate`` does): ``position_ids`` counted over each row's real tokens. The graph
derives them from ``attention_mask`` itself, so an exported language model answers a
left-padded batch as the torch model does, with the same inputs.

The directory helpers write an export atomically: into a temporary sibling, moved into place
only once complete (an existing export is replaced only by a complete one).
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from slimline.core.batches import Batch, positions_from_mask, split_labels
from slimline.export.parity import batch_tensors as tensors
from slimline.export.parity import is_sequence

if TYPE_CHECKING:
    from slimline.export.report import ExportReport


class GraphForward(nn.Module):
    """``model`` called with the example's inputs as positional tensors, returning its first
    output tensor: the one-tensor-in, one-tensor-out form every exporter and runtime names."""

    def __init__(self, model: nn.Module, batch: Batch) -> None:
        super().__init__()
        self.model = model
        self.keys = list(batch) if isinstance(batch, Mapping) else None
        self.input_names = input_names(batch)
        # A language model would also build and return its KV cache: not part of the graph.
        self.extra = {"use_cache": False} if self.keys and takes(model, "use_cache") else {}
        self.positions = bool(self.keys) and "attention_mask" in self.input_names \
            and "position_ids" not in self.input_names and takes(model, "position_ids")
        self.output_name = "output"

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.keys is None:
            out = self.model(*args)
        else:
            inputs = dict(zip(self.keys, args, strict=True))
            if self.positions:
                inputs["position_ids"] = padded_positions(inputs["attention_mask"])
            out = self.model(**inputs, **self.extra)
        name, tensor = first_output(out)
        self.output_name = name
        return tensor


T = TypeVar("T")

def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ``position_ids``: counted over real tokens when some row of ``mask`` is
    left-padded (``core.batches.positions_from_mask``), else ``0 … T-1`` as a model counts
    them itself. Both are computed and one selected, so that a graph holds no branch."""
    mask = mask.long()
    counted = positions_from_mask(mask)
    plain = torch.ones_like(mask).cumsum(dim=1) - 1  # arange(T) broadcast, traceable
    left_padded = (mask[:, 1:] > mask[:, :-1]).any()
    return torch.where(left_padded, counted, plain)


def first_output(output: Any) -> tuple[str, torch.Tensor]:
    """The name and tensor of a model's first output (logits, last hidden state, ...)."""
    if isinstance(output, torch.Tensor):
        return "output", output
    if isinstance(output, Mapping):  # transformers' ModelOutput is an ordered mapping
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                return str(key), value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return "output", output[0]
    raise TypeError(f"export: cannot find an output tensor in a {type(output).__name__}")


def takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def input_names(batch: Batch) -> list[str]:
    """The graph's input names: a dict batch's keys, else ``input`` or ``input_0``, ..."""
    if isinstance(batch, Mapping):
        return list(batch)
    if isinstance(batch, torch.Tensor):
        return ["input"]
    return [f"input_{i}" for i in range(len(batch))]


def dynamic_axes(
    graph: GraphForward, examples: list[Batch], outputs: list[torch.Tensor]
) -> dict[str, dict[int, str]]:
    """Batch (axis 0) of every input, sequence (axis 1) of token inputs; an output's axes are
    those whose size changed between the first two examples."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(graph.input_names, tensors(examples[0]), strict=True):
        axes[name] = {0: "batch", 1: "sequence"} if is_sequence(t) else {0: "batch"}
    sizes = zip(outputs[0].shape, outputs[1].shape, strict=True)
    axes[graph.output_name] = {i: "batch" if i == 0 else "sequence"
                               for i, (a, b) in enumerate(sizes) if a != b}
    return axes


def references(
    graph: GraphForward, examples: list[Batch]
) -> tuple[list[Batch], list[torch.Tensor]]:
    """The torch model's outputs on ``examples``; the first two are required, a later one
    the model itself cannot run (a 1-token sequence for a convolution) is left out."""
    kept, outputs = [], []
    with torch.no_grad():
        for i, batch in enumerate(examples):
            try:
                outputs.append(graph(*tensors(batch)))
            except Exception:
                if i < 2:
                    raise
                continue
            kept.append(batch)
    return kept, outputs


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


def check_eval(graph: nn.Module) -> None:
    """RuntimeError if a module is still in training mode (dropout would stay on)."""
    left = [name or "<model>" for name, m in graph.named_modules() if m.training]
    if left:
        raise RuntimeError(f"export: modules still in training mode after eval(): {left[:5]}")


def check_example(example: object) -> Batch:
    """The example batch without labels (TypeError/ValueError naming ``example``)."""
    from slimline.core.batches import check_batch

    batch, _ = split_labels(check_batch(example, where="export: example"))
    return batch


def reason(exc: BaseException) -> str:
    """The root cause of a converter's failure, on one short line (its wrappers only say
    which stage failed)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def describe_source(report: ExportReport, model: nn.Module) -> None:
    """Record in ``report`` the built-in ``model`` came from, its parameter count and the most
    positions it takes (``details["context_length"]``: text for the export is cut to it)."""
    from slimline.core.checkpoint import SOURCE_ATTR
    from slimline.evaluate.footprint import count_params

    source = getattr(model, SOURCE_ATTR, None)
    report.source = source if isinstance(source, str) else None
    report.params = count_params(model)
    positions = max_positions(model)
    if positions is not None:
        report.details["context_length"] = positions


def max_positions(model: nn.Module) -> int | None:
    """The most positions ``model`` takes: its config's ``max_position_embeddings`` (GPT-2:
    ``n_positions``), an exported model's recorded ``context``, or None when it says none."""
    config = getattr(model, "config", None)
    for value in (getattr(config, "max_position_embeddings", None),
                  getattr(config, "n_positions", None), getattr(model, "context", None)):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def companions(model: nn.Module, directory: Path, tokenizer: Any | None, *,
               config: bool = True) -> list[str]:
    """The config (unless ``config`` is False), and the source's tokenizer and
    sentence-transformers files (not weights)."""
    from slimline.core.checkpoint import SOURCE_DIR_ATTR
    from slimline.export.source_files import copy_source_files

    copied: list[str] = []
    source = getattr(model, SOURCE_DIR_ATTR, None)
    if source is not None and Path(source).is_dir():
        copied += copy_source_files(Path(source), directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
        copied.append("tokenizer")
    hf_config = getattr(model, "config", None) if config else None
    if hf_config is not None and hasattr(hf_config, "to_json_file"):
        hf_config.to_json_file(str(directory / "config.json"))
        copied.append("config.json")
    return copied


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, shared storage counted once."""
    seen = {t.data_ptr(): t.numel() * t.element_size()
            for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def write_atomically(path: str | Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then move it to ``path``;
    nothing is left behind when ``write`` raises. Returns what ``write`` returned."""
    from slimline.core.checkpoint import _replace_dir

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"export: {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        result = write(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def clear(directory: Path) -> None:
    """Remove everything in ``directory`` (a failed attempt's files)."""
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
