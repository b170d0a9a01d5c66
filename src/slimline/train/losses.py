"""Training losses: data-free distillation from the original model, or the model's own loss.

Calibration batches rarely carry labels, so a compressed model learns by default to match the
original one (data-free distillation as in LLM-QAT, arXiv 2305.17888): KL divergence of the
next-token (or class) distributions where the model gives ``logits``, squared error relative
to the teacher's energy for hidden states (per token) and plain tensors. :func:`task_loss` is
the model's own loss on batches that carry ``labels``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.batches import Batch, forward, split_labels

# Teacher targets are kept per batch up to this many bytes, else recomputed every step.
TEACHER_CACHE_BYTES = 256 * 2**20


def output_signal(output: Any, *, owner: str = "train") -> tuple[torch.Tensor, bool]:
    """The model's answer as float32 and whether it is logits (KL) or features (MSE).

    ``owner`` names the step in the error raised when no tensor is found.
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits.float(), True
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden.float(), False
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if isinstance(output, torch.Tensor):
        return output.float(), False
    raise TypeError(f"{owner}: cannot find an output tensor in a {type(output).__name__}")


def token_mask(batch: Batch, shape: torch.Size) -> torch.Tensor | None:
    """The attention mask (B, T) when the answer is per token (B, T, C), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and len(shape) == 3 and mask.shape == shape[:2]:
        return mask.to(torch.float32)
    return None


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, is_logits: bool, mask: torch.Tensor | None
) -> torch.Tensor:
    """KL(teacher ‖ student) per position for logits (``teacher`` as log-probabilities), else
    squared error relative to the teacher's energy; averaged over the positions ``mask``
    (B, T) keeps (all when None). Shapes (..., C)."""
    if is_logits:
        per_row = (teacher.exp() * (teacher - student.log_softmax(-1))).sum(-1)  # (...)
        norm = None
    else:
        per_row = (student - teacher).pow(2).sum(-1)
        norm = teacher.pow(2).sum(-1)
    if mask is None:
        mask = torch.ones_like(per_row)
    loss = (per_row * mask).sum() / mask.sum().clamp_min(1.0)
    if norm is not None:
        loss = loss / ((norm * mask).sum() / mask.sum().clamp_min(1.0)).clamp_min(1e-12)
    return loss


def task_loss(model: nn.Module, batch: Batch, *, field: str = "loss") -> torch.Tensor:
    """The model's own loss on a batch with ``labels``.

    Models whose ``forward`` takes ``labels`` (Hugging Face task heads, which shift the
    labels of causal LMs themselves) give ``output.loss``; otherwise the cross-entropy of
    the logits with the labels (ignoring -100). ``field`` is the config field named in errors.
    """
    inputs, labels = split_labels(batch)
    if labels is None or not isinstance(batch, Mapping):
        raise ValueError(f"{field}: 'task' needs dict batches with 'labels'")
    if "labels" in inspect.signature(model.forward).parameters:
        loss = getattr(model(**batch), "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
    logits, is_logits = output_signal(forward(model, inputs), owner=field)
    if not is_logits and logits.shape[:-1] != labels.shape:
        raise ValueError(f"{field}: 'task' needs a model whose output are logits for 'labels'")
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


class TeacherTargets:
    """The original model's targets per batch, cached while they fit.

    ``as_teacher()`` is a context manager under which ``model`` computes as the original (for
    ``qat``: fake quantization switched off), so no frozen copy of the model is needed. The
    targets of a batch are cached while all fit in :data:`TEACHER_CACHE_BYTES`, then each
    batch's teacher pass runs once; beyond, they are recomputed at each step.
    """

    def __init__(
        self,
        model: nn.Module,
        as_teacher: Callable[[], AbstractContextManager[object]],
        *,
        owner: str = "train",
    ) -> None:
        self.model, self.as_teacher, self.owner = model, as_teacher, owner
        self.cache: dict[int, tuple[torch.Tensor, bool]] = {}
        self.cached_bytes = 0

    @torch.no_grad()
    def target(self, index: int, batch: Batch) -> tuple[torch.Tensor, bool]:
        """(answer, is_logits) of batch ``index``: log-probabilities when logits."""
        if index in self.cache:
            return self.cache[index]
        with self.as_teacher():
            answer, is_logits = output_signal(forward(self.model, batch), owner=self.owner)
        if is_logits:
            answer = answer.log_softmax(-1)
        size = answer.numel() * answer.element_size()
        if self.cached_bytes + size <= TEACHER_CACHE_BYTES:
            self.cache[index] = (answer, is_logits)
            self.cached_bytes += size
        return answer, is_logits
