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


# --- distillation losses (``distill``) --------------------------------------------------------


def masked_mean(per_row: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_row`` (...) over the positions ``mask`` (same shape) keeps; all if None."""
    if mask is None:
        return per_row.mean()
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


def kl_with_temperature(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per position, averaged over ``mask``.

    Logits (..., V). The ``T²`` factor (Hinton et al., arXiv 1503.02531, §2) keeps the
    gradient's size independent of the temperature: at high ``T`` it tends to
    ``(s - t) / V`` for zero-mean logits.
    """
    t = temperature
    log_p = (teacher.float() / t).log_softmax(-1)
    log_q = (student.float() / t).log_softmax(-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    return masked_mean(per_row, mask) * t * t


def pooled_cosine_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``1 - cos`` of the mask-aware mean-pooled embeddings, averaged over the batch.

    Hidden states (B, T, C), ``mask`` (B, T) with 1 on real tokens: sentence encoders such as
    all-MiniLM-L6-v2 embed a sentence as the mean of its real tokens' states.
    """
    from slimline.core.batches import mean_pool

    s = mean_pool(student.float(), mask)  # (B, C)
    t = mean_pool(teacher.float(), mask)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer matched to each student layer: TinyBERT's uniform map ``g(m) = m·N/M``
    (arXiv 1909.10351, §3.1), over hidden-state lists that include the embeddings (index 0)
    so that embeddings match embeddings and the last layer the last."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"need hidden states on both sides, got {n_student} and {n_teacher}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(m * (n_teacher - 1) / (n_student - 1)) for m in range(n_student)]


def hidden_state_loss(
    student: tuple[torch.Tensor, ...],
    teacher: tuple[torch.Tensor, ...],
    projections: nn.ModuleList | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """TinyBERT's hidden-state loss (arXiv 1909.10351, eq. 7): the student's states (B, T, C_s),
    through a learned projection ``W_h`` (C_s → C_t) where the widths differ, against the
    mapped teacher states (B, T, C_t); squared error relative to the teacher's energy per
    token (so that layers of any scale weigh alike), averaged over layers and real tokens."""
    pairs = layer_map(len(student), len(teacher))
    total = torch.zeros((), device=student[0].device)
    for i, j in enumerate(pairs):
        s = student[i].float()
        if projections is not None:
            s = projections[i](s)
        total = total + distill_loss(s, teacher[j].float(), False, mask)
    return total / len(pairs)
