"""Quality metrics as pure functions on tensors.

Each function returns *accumulators* (a sum and a count) for one batch rather than a mean,
so that batches of different sizes combine exactly: the mean over a data set is
``sum(sums) / sum(counts)``. :class:`Mean` does that bookkeeping.

Shapes: ``B`` items, ``T`` tokens, ``V`` vocabulary (or classes), ``C`` features.
Comparisons take the *reference* (the uncompressed baseline) first.

Masks: for token outputs (B, T, ...) an ``attention_mask`` (B, T) marks real tokens with 1;
padded positions never count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # Hugging Face's label for "no target here"


@dataclass
class Mean:
    """A running weighted mean: add ``(sum, count)`` pairs, read :attr:`value`."""

    total: float = 0.0
    count: int = 0

    def add(self, pair: tuple[float, int]) -> None:
        self.total += pair[0]
        self.count += pair[1]

    @property
    def value(self) -> float:
        """The mean so far; NaN before anything was counted."""
        return self.total / self.count if self.count else math.nan


def next_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed negative log-likelihood of each next token, and the number of tokens scored.

    ``logits`` (B, T, V) at position t predict ``input_ids`` (B, T) at t + 1. A prediction
    counts only when both its context position t and its target t + 1 are real tokens, so
    with left padding the first real token is not "predicted" from a pad.
    """
    scores = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    keep = _pair_mask(attention_mask, targets)
    nll = F.cross_entropy(scores.flatten(0, 1), targets.flatten(), reduction="none")
    nll = nll.view_as(targets)
    return float(nll[keep].double().sum()), int(keep.sum())


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the mean next-token NLL (accumulated by :func:`next_token_nll`)."""
    if tokens <= 0:
        raise ValueError("perplexity: no token was scored (every sequence shorter than 2?)")
    return math.exp(nll_sum / tokens)


def _pair_mask(attention_mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: context and target both real."""
    if attention_mask is None:
        return torch.ones_like(targets, dtype=torch.bool)
    mask = attention_mask.bool()
    return mask[:, :-1] & mask[:, 1:]


def shift_for_next_token(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM scores (B, T, V) with Hugging Face labels (B, T): t predicts t + 1."""
    return scores[:, :-1], labels[:, 1:]


def accuracy_counts(
    scores: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[int, int]:
    """Correct top-1 predictions and the number of labelled targets.

    ``scores`` (..., V) and ``labels`` (...) of the same leading shape; labels equal to
    ``ignore_index`` do not count. For a causal LM, shift first (:func:`shift_for_next_token`).
    """
    if scores.shape[:-1] != labels.shape:
        raise ValueError(
            f"accuracy: scores of shape {tuple(scores.shape)} do not match labels of shape "
            f"{tuple(labels.shape)} (expected scores (..., classes) and labels (...))"
        )
    keep = labels != ignore_index
    correct = (scores.argmax(dim=-1) == labels) & keep
    return int(correct.sum()), int(keep.sum())


def cosine_sum(
    reference: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Sum over items of the cosine similarity of their output vectors, and the item count.

    Each item's whole output is one vector: (B, C) embeddings or class scores as they are,
    (B, T, V) token logits flattened per item to T*V values. Flattening per item (rather
    than averaging per-token cosines) weighs each item once and keeps long sequences from
    dominating. ``mask`` (B, T) zeroes padded positions in both outputs before flattening,
    so padding adds nothing to the dot product or the norms. Computed in float64.
    """
    ref, out = reference.double(), output.double()
    if mask is not None:
        weights = _broadcast_mask(mask, ref)
        ref, out = ref * weights, out * weights
    ref, out = ref.flatten(1), out.flatten(1)  # (B, N)
    dot = (ref * out).sum(dim=1)
    norms = ref.norm(dim=1) * out.norm(dim=1)
    cos = dot / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return float(cos.sum()), int(cos.numel())


def kl_sum(
    reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Sum of KL(reference ‖ model) over positions, and the number of positions.

    A position is one distribution over the last dimension: an item for (B, V) class
    scores, a token for (B, T, V) language-model logits (each token's next-token
    distribution; ``mask`` (B, T) drops padding). KL(p‖q) = Σ_v p_v (log p_v − log q_v),
    in nats.
    """
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (...) one value per position
    keep = _position_mask(mask, kl)
    return float(kl[keep].double().sum()), int(keep.sum())


def agreement_counts(
    reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[int, int]:
    """Positions where both models rank the same class/token first, and the position count."""
    same = reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)  # (...)
    keep = _position_mask(mask, same)
    return int(same[keep].sum()), int(keep.sum())


def _position_mask(mask: torch.Tensor | None, per_position: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(per_position, dtype=torch.bool)
    return mask.bool().to(per_position.device).expand_as(per_position)


def _broadcast_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, T) mask shaped to multiply ``like`` (B, T, ...)."""
    weights = mask.to(device=like.device, dtype=like.dtype)
    return weights.view(*weights.shape, *([1] * (like.dim() - weights.dim())))
