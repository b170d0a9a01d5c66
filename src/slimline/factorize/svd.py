"""``svd``: truncated SVD of each Linear-like weight, W (N, K) ≈ B (N, r) · A (r, K).

The Eckart–Young theorem makes the rank-r truncation the best rank-r approximation of W in
Frobenius norm; it knows nothing of the inputs, which is what ``asvd`` (arXiv 2312.05821)
and ``svd_llm`` (arXiv 2403.07378) add. The layer becomes two Linear layers (K → r → N),
fewer weights and FLOPs for every r < N·K / (N + K). No calibration data needed; with
``allocation: sensitivity`` and calibration data, ranks are allocated by output cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.registry import StepContext, StepOutcome, register
from slimline.factorize.base import FactorStats, LowRankConfig, factorize_layers
from slimline.factorize.decomposition import Decomposition, svd_of
from slimline.search.ranges import FloatRange, SearchSpace


@dataclass(frozen=True, kw_only=True)
class SvdConfig(LowRankConfig):
    """Plain truncated SVD (fields: :class:`LowRankConfig`)."""

    method: ClassVar[str] = "svd"
    summary: ClassVar[str] = "truncated SVD: each Linear → two thin Linears (K→r→N)"
    paper: ClassVar[str] = "Eckart–Young; low-rank baseline of arXiv 2312.05821, 2403.07378"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"ratio": FloatRange(0.2, 0.9, step=0.05)}


def svd_decompose(weight: torch.Tensor, _stats: FactorStats | None = None) -> Decomposition:
    """W (N, K) = U diag(s) Vᵀ: the transform is the identity."""
    return svd_of(weight)


@register(SvdConfig)
def apply_svd(model: nn.Module, cfg: SvdConfig, ctx: StepContext) -> StepOutcome:
    return factorize_layers(model, cfg, ctx, svd_decompose)
