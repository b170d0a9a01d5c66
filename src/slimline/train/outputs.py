"""What a training step reads from a model's forward: its answer, hidden states, own loss.

One reader for every training step (``qat``, ``distill``, ``lora``): the answer is the
``logits`` where the model gives them, else an encoder's ``last_hidden_state``, else the
first tensor it returns. The teacher's outputs are computed without gradients and kept per
batch while they fit (they do not change during training).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimline.core.batches import Batch, split_labels, token_mask, with_positions

Kind = Literal["logits", "hidden", "tensor"]

# Teacher outputs are kept per batch up to this many bytes (unless told otherwise), else
# recomputed every step.
TEACHER_CACHE_BYTES = 256 * 2**20


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


def run_model(
    model: nn.Module, batch: Batch, *, hidden: bool = False, labels: bool = False,
    owner: str = "train",
) -> Outputs:  # fmt: skip
    """Call ``model`` on ``batch`` asking for hidden states (``hidden``) and its own loss on
    the batch's ``labels`` (``labels``, when its forward takes them); ``owner`` names the
    step in the error raised when the model returns no tensor."""
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
    return read_outputs(out, owner=owner)


def _field(out: Any, name: str) -> Any:
    value = getattr(out, name, None)
    if value is None and isinstance(out, Mapping):
        value = out.get(name)
    return value


def read_outputs(out: Any, *, owner: str = "train") -> Outputs:
    """The :class:`Outputs` of whatever a forward returned (Hugging Face output, dict, tuple
    or tensor); TypeError naming ``owner`` when there is no tensor in it."""
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
    raise TypeError(f"{owner}: cannot find an output tensor in a {type(out).__name__}")


def answer_mask(batch: Batch, answer: torch.Tensor) -> torch.Tensor | None:
    """(B, T) real-token mask when the answer is per token (B, T, C), else None (every
    position counts)."""
    mask = token_mask(batch)
    if mask is not None and answer.dim() == 3 and mask.shape == answer.shape[:2]:
        return mask
    return None


class TeacherOutputs:
    """The teacher's :class:`Outputs` per batch index, cached while they fit in
    ``cache_bytes`` (default :data:`TEACHER_CACHE_BYTES`); the teacher runs in eval mode
    without gradients and is left in the mode it was in.

    ``as_teacher()`` is a context manager under which ``teacher`` computes as the teacher
    (``qat``: the student itself with fake quantization switched off, so that no frozen copy
    of the model is needed); None for a separate teacher model.
    """

    def __init__(
        self,
        teacher: nn.Module,
        batches: Sequence[Batch],
        *,
        hidden: bool = False,
        as_teacher: Callable[[], AbstractContextManager[object]] | None = None,
        owner: str = "train",
        cache_bytes: int | None = None,
    ) -> None:
        self.teacher, self.batches, self.hidden = teacher, batches, hidden
        self.as_teacher, self.owner = as_teacher or nullcontext, owner
        self.cache_bytes = TEACHER_CACHE_BYTES if cache_bytes is None else cache_bytes
        self.cache: dict[int, Outputs] = {}
        self.cached_bytes = 0

    @torch.no_grad()
    def __call__(self, index: int) -> Outputs:
        if index in self.cache:
            return self.cache[index]
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with self.as_teacher():
                out = run_model(self.teacher, self.batches[index], hidden=self.hidden,
                                owner=self.owner)  # fmt: skip
        finally:
            self.teacher.train(was_training)
        out.loss = None
        if self.cached_bytes + out.nbytes() <= self.cache_bytes:
            self.cache[index] = out
            self.cached_bytes += out.nbytes()
        return out

    def on(self, batches: Sequence[Batch]) -> TeacherOutputs:
        """The same teacher over other batches (a held-out slice), with its own cache."""
        return TeacherOutputs(self.teacher, batches, hidden=self.hidden, as_teacher=self.as_teacher,
                              owner=self.owner, cache_bytes=self.cache_bytes)  # fmt: skip
