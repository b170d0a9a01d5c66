"""``sparsegpt``: one-shot pruning with OBS weight reconstruction (arXiv 2301.00774).

Columns are processed left to right in blocks; when a weight is pruned its error is spread
over the not-yet-processed columns through the inverse Hessian of the layer's least-squares
problem, so the layer's output on the calibration inputs changes as little as possible.
The mask is chosen per block of columns ("adaptive mask selection", §3.3) from w² / [H⁻¹]²ᵢᵢ.
The column sweep is :func:`slimline.core.obs.obs_sweep`, shared with GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.families import Family
from slimline.core.obs import Decide, masked_problem, obs_sweep
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import InputStats, inverse_hessian_factor
from slimline.prune.base import UnstructuredPruneConfig, prune_layerwise
from slimline.prune.masks import nm_mask, parse_pattern, unstructured_mask
from slimline.search.ranges import FloatRange, SearchSpace


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(UnstructuredPruneConfig):
    """SparseGPT: prune with Hessian-based reconstruction of the surviving weights."""

    method: ClassVar[str] = "sparsegpt"
    family: ClassVar[Family] = Family.PRUNE
    needs_calibration: ClassVar[bool] = True
    summary: ClassVar[str] = "one-shot pruning with OBS reconstruction of the kept weights"
    paper: ClassVar[str] = "SparseGPT, arXiv 2301.00774"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"sparsity": FloatRange(0.1, 0.7, step=0.05)}

    # Columns updated together (the paper's B = 128): lazy batched updates, same result.
    block_size: int = 128
    # Dampening λ = percdamp · mean(diag H) keeps H invertible (the paper uses 1%).
    dampening: float = 0.01

    def check(self) -> None:
        super().check()
        if self.block_size < 1:
            self.fail("block_size", f"must be ≥ 1, got {self.block_size}")
        if not 0.0 < self.dampening < 1.0:
            self.fail("dampening", f"{self.dampening} is outside (0, 1)")


def sparsegpt_prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    pattern: str | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> torch.Tensor:
    """Pruned and reconstructed copy of ``weight`` (out, in), given H (in, in).

    Unstructured: exactly ``round(sparsity·numel)`` zeros, spread over column blocks in
    proportion to their width. N:M: N kept in every M consecutive inputs of a row.
    """
    w, h = masked_problem(weight, hessian)
    hinv = inverse_hessian_factor(h, dampening, overwrite=True)  # (in, in) upper; h: our copy
    del h
    nm = parse_pattern(pattern) if pattern is not None else None
    if nm is not None and block_size % nm[1]:
        block_size = nm[1] * max(1, block_size // nm[1])  # N:M groups never straddle blocks
    decide = _pruner(w.shape, hinv, sparsity, nm, block_size)
    return obs_sweep(w, hinv, block_size, decide).to(weight.dtype)


def _pruner(
    shape: torch.Size,
    hinv: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    block_size: int,
) -> Decide:
    """SparseGPT's OBS decision for a weight of ``shape``: the column with its mask applied,
    the mask chosen from w² / [H⁻¹]²ᵢᵢ when its block (unstructured: "adaptive mask
    selection", §3.3) or its M columns (N:M) are reached, on the weights updated so far."""
    rows, cols = shape
    diag = torch.diag(hinv).pow(2).unsqueeze(0)  # (1, in)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=hinv.device)

    def decide(j: int, w: torch.Tensor) -> torch.Tensor:
        if nm is None and j % block_size == 0:  # the first column of one of obs_sweep's blocks
            end = min(j + block_size, cols)
            share = _block_share(sparsity, rows, cols, j, end)
            keep[:, j:end] = unstructured_mask(w[:, j:end].pow(2) / diag[:, j:end], share)
        elif nm is not None and j % nm[1] == 0:
            group = slice(j, j + nm[1])
            keep[:, group] = nm_mask(w[:, group].pow(2) / diag[:, group], *nm)
        col = w[:, j]
        return torch.where(keep[:, j], col, torch.zeros_like(col))

    return decide


def _block_share(sparsity: float, rows: int, cols: int, start: int, end: int) -> float:
    """Sparsity for columns [start, end) so the per-block counts add up to the exact total."""
    total = rows * cols
    pruned = round(sparsity * total * end / cols) - round(sparsity * total * start / cols)
    return pruned / (rows * (end - start))


@register(SparseGPTConfig)
def apply_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, ctx: StepContext) -> StepOutcome:
    def prune(weight: torch.Tensor, stats: InputStats, sparsity: float) -> torch.Tensor:
        return sparsegpt_prune_weight(
            weight, stats.hessian, sparsity=sparsity, pattern=cfg.pattern,
            block_size=cfg.block_size, dampening=cfg.dampening,
        )

    return prune_layerwise(model, cfg, ctx, prune, hessian=True)
