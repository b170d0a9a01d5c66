"""What distillation reads from a model's forward: its answer, hidden states, own loss.

The student and the teacher are called the same way; the teacher's outputs are computed
without gradients and kept per batch while they fit (they do not change during training).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimline.core.batches import Batch, split_labels, token_mask, with_positions
from slimline.train.losses import TEACHER_CACHE_BYTES

Kind = Literal["logits", "hidden", "tensor"]


@dataclass
class Outputs:
    """One forward pass: ``answer`` is logits (..., V), encoder states (B, T, C) or a plain
    tensor; ``hidden`` the per-layer states when asked; ``loss`` the model's own loss."""

    kind: Kind
    answer: torch.Tensor
    hidden: tuple[torch.Tensor, ...] | None = None
    loss: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [self.answer, *(self.hidden or ())]
        return sum(t.numel() * t.element_size() for t in tensors)


def _takes(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def run_model(model: nn.Module, batch: Batch, *, hidden: bool, labels: bool) -> Outputs:
    """Call ``model`` on ``batch`` asking for hidden states (``hidden``) and its own loss on
    the batch's ``labels`` (``labels``, when its forward takes them)."""
    inputs, targets = split_labels(batch)
    if isinstance(inputs, Mapping):
        kwargs: dict[str, Any] = with_positions(model, inputs)
        # Hugging Face models take it directly or through ``**kwargs`` (transformers 5).
        hf = hasattr(getattr(model, "config", None), "output_hidden_states")
        if hidden and (hf or _takes(model, "output_hidden_states")):
            kwargs["output_hidden_states"] = True
        if labels and targets is not None and _takes(model, "labels"):
            kwargs["labels"] = targets
        out = model(**kwargs)
    elif isinstance(inputs, torch.Tensor):
        out = model(inputs)
    else:
        out = model(*inputs)
    return _read(out)


def _field(out: Any, name: str) -> Any:
    value = getattr(out, name, None)
    if value is None and isinstance(out, Mapping):
        value = out.get(name)
    return value


def _read(out: Any) -> Outputs:
    states = _field(out, "hidden_states")
    states = tuple(states) if isinstance(states, (tuple, list)) and states else None
    loss = _field(out, "loss")
    loss = loss if isinstance(loss, torch.Tensor) else None
    logits = _field(out, "logits")
    if isinstance(logits, torch.Tensor):
        return Outputs("logits", logits, states, loss)
    last = _field(out, "last_hidden_state")
    if isinstance(last, torch.Tensor):
        return Outputs("hidden", last, states, loss)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return Outputs("tensor", out, states, loss)
    raise TypeError(f"distill: cannot find an output tensor in a {type(out).__name__}")


def positions_mask(batch: Batch, answer: torch.Tensor) -> torch.Tensor | None:
    """(B, T) real-token mask when the answer is per token (B, T, C), else None."""
    mask = token_mask(batch)
    if mask is not None and answer.dim() == 3 and mask.shape == answer.shape[:2]:
        return mask
    return None


class TeacherOutputs:
    """The teacher's :class:`Outputs` per batch index, cached while they fit in
    :data:`~slimline.train.losses.TEACHER_CACHE_BYTES`; the teacher runs in eval mode
    without gradients and is left in the mode it was in."""

    def __init__(self, teacher: nn.Module, batches: list[Batch], *, hidden: bool) -> None:
        self.teacher, self.batches, self.hidden = teacher, batches, hidden
        self.cache: dict[int, Outputs] = {}
        self.cached_bytes = 0

    @torch.no_grad()
    def __call__(self, index: int) -> Outputs:
        if index in self.cache:
            return self.cache[index]
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            out = run_model(self.teacher, self.batches[index], hidden=self.hidden, labels=False)
        finally:
            self.teacher.train(was_training)
        out.loss = None
        if self.cached_bytes + out.nbytes() <= TEACHER_CACHE_BYTES:
            self.cache[index] = out
            self.cached_bytes += out.nbytes()
        return out
