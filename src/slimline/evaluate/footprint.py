"""What a model is made of: bytes in memory and on disk, parameters, sparsity, FLOPs.

Conventions (MEASURING.md, "Size is bytes"):

- *Size in memory* counts the bytes of every parameter and buffer **as stored**: each
  underlying storage once, so tied or shared tensors count once, and a packed int4 weight
  kept in a uint8 tensor counts its real bytes. Tensor subclasses that wrap inner tensors
  (``__tensor_flatten__``, as torchao's quantized tensors do) are counted through their
  inner tensors.
- torch's own quantized modules (``torch.ao``'s dynamic ``Linear``) keep their weights in a
  packed object that is neither parameter nor buffer; their weight and bias are counted as
  ``_weight_bias()`` unpacks them (the quantized bytes, plus per-channel scales).
- *Size on disk* is the bytes of the directory ``slimline.core.checkpoint.save`` writes,
  summed over files by their apparent size, as ``du -b`` does.
- *Params* counts logical weights. A module that stores its weights packed exposes
  ``logical_numel() -> int``, the number of values its own (direct) tensors represent, bias
  included; it replaces the element count of that module's own parameters. Every other
  parameter counts its ``numel()``. A shared parameter counts once.
- *Sparsity* is the fraction of exact zeros among the weights of Linear-like modules
  (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face's ``Conv1D``). A module exposing
  ``zero_count() -> int`` reports its zeros itself, out of ``logical_numel()`` values
  (or its ``weight.numel()`` if it has no ``logical_numel``). Quantized weights count
  the zeros of their dequantized values; a tensor subclass that cannot dequantize is left
  out of both counts.
- *FLOPs* are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one forward of
  one batch (a multiply-add is 2 FLOPs). Only operators it knows are counted: custom
  kernels (e.g. packed-int matmuls) count 0 unless they register a formula.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from slimline.core.batches import Batch, forward

SaveFn = Callable[[nn.Module, Path], object]


def size_in_memory(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored, each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in (*_parameters_and_buffers(model), *_all_packed_tensors(model)):
        for leaf in _stored_tensors(tensor):
            if leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            key = (str(leaf.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _parameters_and_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _packed_weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Weight and bias of a torch.ao packed-params module (LinearPackedParams), else None."""
    unpack = getattr(module, "_weight_bias", None)
    packed = getattr(module, "_packed_params", None)
    # The quantized Linear forwards _weight_bias to its LinearPackedParams child (whose
    # _packed_params is the opaque object); only the child is counted.
    if not callable(unpack) or packed is None or isinstance(packed, nn.Module):
        return None
    weight, bias = unpack()
    return weight, bias


def _all_packed_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        packed = _packed_weight_bias(module)
        if packed is None:
            continue
        weight, bias = packed
        yield weight
        if bias is not None:
            yield bias
        if weight.is_quantized and weight.qscheme() in _PER_CHANNEL:
            yield weight.q_per_channel_scales()
            yield weight.q_per_channel_zero_points()


_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_affine_float_qparams)


def _stored_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data (its inner tensors for subclasses)."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    flatten = getattr(data, "__tensor_flatten__", None)
    if flatten is None or type(data) is torch.Tensor:
        yield data
        return
    names, _ = flatten()
    for name in names:
        inner = getattr(data, name)
        if isinstance(inner, torch.Tensor):
            yield from _stored_tensors(inner)


def size_on_disk(model: nn.Module, save: SaveFn | None = None) -> int:
    """Bytes of the directory that ``save(model, dir)`` writes (default: slimline's save)."""
    save_fn = save or _slimline_save()
    with tempfile.TemporaryDirectory(prefix="slimline-size-") as tmp:
        target = Path(tmp) / "model"
        save_fn(model, target)
        return directory_bytes(target)


def _slimline_save() -> SaveFn:
    # Imported here: the checkpoint module imports the method registry, which evaluation
    # otherwise has no need for.
    from slimline.core.checkpoint import save

    return save


def directory_bytes(path: str | Path) -> int:
    """Apparent size of every file under ``path`` (a link counts itself, not its target)."""
    root = Path(path)
    if root.is_file():
        return root.lstat().st_size
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(folder, name)).st_size
    return total


def count_params(model: nn.Module) -> int:
    """Logical parameter count (see the module docstring for packed modules)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        logical = getattr(module, "logical_numel", None)
        if callable(logical):
            total += int(logical())
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        packed = _packed_weight_bias(module)
        if packed is not None:
            total += sum(t.numel() for t in packed if t is not None)
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


LINEAR_LIKE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_linear_like(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D is matched by name so that transformers is not imported.
    return isinstance(module, LINEAR_LIKE) or type(module).__name__ == "Conv1D"


def weight_zero_counts(model: nn.Module) -> tuple[int, int]:
    """(exact zeros, weights) over Linear-like modules and modules reporting zero_count."""
    seen: set[tuple[str, int, tuple[int, ...]]] = set()
    zeros = total = 0
    for module in model.modules():
        reported = getattr(module, "zero_count", None)
        weight = getattr(module, "weight", None)
        if callable(reported):
            logical = getattr(module, "logical_numel", None)
            zeros += int(reported())
            total += int(logical()) if callable(logical) else _numel(weight)
            continue
        packed = _packed_weight_bias(module)
        if packed is not None:
            weight = packed[0]
        elif not _is_linear_like(module) or not isinstance(weight, torch.Tensor):
            continue
        dense = _dense(weight)
        if dense is None:
            continue
        key = (str(dense.device), dense.data_ptr(), tuple(dense.shape))
        if key in seen:  # a weight tied to another module's counts once
            continue
        seen.add(key)
        zeros += int((dense == 0).sum())
        total += dense.numel()
    return zeros, total


def _dense(weight: torch.Tensor) -> torch.Tensor | None:
    """A plain tensor with ``weight``'s values: dequantized for quantized tensors and
    tensor subclasses; None when a subclass cannot say (then the weight is not counted)."""
    data = weight.detach()
    if type(data) is torch.Tensor and not data.is_quantized:
        return data
    dequantize = getattr(data, "dequantize", None)
    try:
        dense = dequantize() if callable(dequantize) else None
    except (NotImplementedError, RuntimeError):
        return None
    return dense if type(dense) is torch.Tensor else None


def _numel(weight: object) -> int:
    return weight.numel() if isinstance(weight, torch.Tensor) else 0


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the weights of Linear-like modules (0.0 if none)."""
    zeros, total = weight_zero_counts(model)
    return zeros / total if total else 0.0


def count_flops(model: nn.Module, batch: Batch) -> int:
    """FLOPs of one forward of ``model`` on ``batch``, as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward(model, batch)
    return int(counter.get_total_flops())
