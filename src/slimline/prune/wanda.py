"""``wanda``: prune by weights and activations, |W|·‖X‖, no weight update (arXiv 2306.11695)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import InputStats
from slimline.prune.base import UnstructuredPruneConfig, prune_layerwise
from slimline.prune.importance import wanda_score
from slimline.prune.masks import nm_mask, parse_pattern, row_masks
from slimline.search.ranges import FloatRange, SearchSpace


@dataclass(frozen=True, kw_only=True)
class WandaConfig(UnstructuredPruneConfig):
    """Wanda: per output row, drop the weights with the smallest |W_ij|·‖X_j‖₂."""

    method: ClassVar[str] = "wanda"
    family: ClassVar[Family] = Family.PRUNE
    needs_calibration: ClassVar[bool] = True
    summary: ClassVar[str] = "pruning by |W|·‖X‖ per output row, no retraining or update"
    paper: ClassVar[str] = "Wanda, arXiv 2306.11695"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"sparsity": FloatRange(0.1, 0.7, step=0.05)}


def wanda_mask(
    weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, pattern: str | None
) -> torch.Tensor:
    """Keep-mask (out, in): per-row comparison group (the paper's best choice for LLMs)."""
    score = wanda_score(weight, input_norm)
    if pattern is not None:
        return nm_mask(score, *parse_pattern(pattern))
    return row_masks(score, sparsity)


@register(WandaConfig)
def apply_wanda(model: nn.Module, cfg: WandaConfig, ctx: StepContext) -> StepOutcome:
    def prune(weight: torch.Tensor, stats: InputStats, sparsity: float) -> torch.Tensor:
        mask = wanda_mask(weight, stats.input_norm, sparsity, cfg.pattern)
        return weight * mask.to(weight.dtype)

    return prune_layerwise(model, cfg, ctx, prune, hessian=False)
