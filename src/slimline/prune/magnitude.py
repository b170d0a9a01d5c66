"""``magnitude``: unstructured or N:M pruning by |W|, per layer or with one global threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import linear_weight
from slimline.prune.base import UnstructuredPruneConfig
from slimline.prune.importance import magnitude_score
from slimline.prune.masks import global_masks, nm_mask, parse_pattern, unstructured_mask
from slimline.search.ranges import FloatRange, SearchSpace


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(UnstructuredPruneConfig):
    """Zero the smallest weights (Han et al., arXiv 1506.02626); masks stay zero on save."""

    method: ClassVar[str] = "magnitude"
    family: ClassVar[Family] = Family.PRUNE
    summary: ClassVar[str] = "unstructured / N:M pruning of the smallest |W|"
    paper: ClassVar[str] = "Learning both Weights and Connections, arXiv 1506.02626"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"sparsity": FloatRange(0.1, 0.7, step=0.05)}

    # "layer": each layer loses `sparsity` of its weights; "global": one threshold for all,
    # so layers with many small weights lose more (only for unstructured sparsity).
    scope: Literal["layer", "global"] = "layer"

    def check(self) -> None:
        super().check()
        if self.pattern is not None and self.scope == "global":
            self.fail("scope", "'global' applies to unstructured sparsity, not N:M")
        if self.owl and self.scope == "global":
            self.fail("scope", "'global' and owl both set per-layer sparsity; choose one")


def masks_for(
    weights: list[torch.Tensor], cfg: MagnitudeConfig, sparsities: list[float]
) -> list[torch.Tensor]:
    """The keep-masks of ``weights`` (each (out, in)) under ``cfg``."""
    scores = [magnitude_score(w) for w in weights]
    if cfg.pattern is not None:
        n, m = parse_pattern(cfg.pattern)
        return [nm_mask(s, n, m) for s in scores]
    if cfg.scope == "global":
        return global_masks(scores, cfg.sparsity)
    return [unstructured_mask(s, sp) for s, sp in zip(scores, sparsities, strict=True)]


@register(MagnitudeConfig)
def apply_magnitude(model: nn.Module, cfg: MagnitudeConfig, ctx: StepContext) -> StepOutcome:
    chosen = cfg.select_modules(model)
    weights = [linear_weight(m) for _, m in chosen]
    per_layer = cfg.layer_sparsities(model, dict(chosen), ctx)
    masks = masks_for(weights, cfg, [per_layer[n] for n, _ in chosen])
    with torch.no_grad():
        for weight, mask in zip(weights, masks, strict=True):
            weight.mul_(mask.to(weight.dtype))
    kept = sum(int(torch.count_nonzero(w)) for w in weights)
    total = sum(w.numel() for w in weights)
    note = f"sparsity of pruned layers: {1 - kept / max(total, 1):.4f}"
    return StepOutcome(modules=[n for n, _ in chosen], notes=[note])
