"""Training losses: data-free distillation from the original model, or the model's own loss.

Calibration batches rarely carry labels, so a compressed model learns by default to match the
original one (data-free distillation as in LLM-QAT, arXiv 2305.17888): KL divergence of the
next-token (or class) distributions where the model gives ``logits``, squared error relative
to the teacher's energy for hidden states (per token) and plain tensors. :func:`task_loss` is
the model's own loss on batches that carry ``labels``; :func:`output_loss` picks the
distillation loss (``qat``, ``distill``) by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.batches import Batch, split_labels
from slimline.train.outputs import Outputs, run_model

OutputLoss = Literal["kl", "cosine", "mse"]


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
    mask = torch.ones_like(per_row) if mask is None else mask.to(per_row.dtype)
    loss = (per_row * mask).sum() / mask.sum().clamp_min(1.0)
    if norm is not None:
        loss = loss / ((norm * mask).sum() / mask.sum().clamp_min(1.0)).clamp_min(1e-12)
    return loss


def task_loss_of(outputs: Outputs, labels: torch.Tensor, *, field: str = "loss") -> torch.Tensor:
    """The task loss of a forward that saw ``labels``: the model's own ``loss`` where it
    gave one (Hugging Face task heads, which shift the labels of causal LMs themselves),
    else the cross-entropy of the logits with the labels (ignoring -100). ``field`` is the
    config field named in errors."""
    if outputs.loss is not None:
        return outputs.loss
    answer = outputs.answer
    if outputs.kind != "logits" and answer.shape[:-1] != labels.shape:
        raise ValueError(f"{field}: 'task' needs a model whose output are logits for 'labels'")
    return F.cross_entropy(answer.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def task_loss(model: nn.Module, batch: Batch, *, field: str = "loss") -> torch.Tensor:
    """The model's own loss on a dict batch with ``labels`` (:func:`task_loss_of`)."""
    _, labels = split_labels(batch)
    if labels is None or not isinstance(batch, Mapping):
        raise ValueError(f"{field}: 'task' needs dict batches with 'labels'")
    return task_loss_of(run_model(model, batch, labels=True, owner=field), labels, field=field)


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


def output_loss(
    kind: OutputLoss,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The student's answer against the teacher's: ``kl`` of the (softened) logits ×T²,
    ``cosine`` of the mean-pooled states (B, T, C), ``mse`` relative to the teacher's energy."""
    if kind == "kl":
        return kl_with_temperature(student, teacher, temperature, mask)
    if kind == "cosine":
        return pooled_cosine_loss(student, teacher, mask)
    return distill_loss(student.float(), teacher.float(), False, mask)


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
