"""``asvd``: activation-aware SVD (Yuan et al., arXiv 2312.05821).

Input channels that carry large activations matter more to the layer's output, but plain SVD
treats every column of W alike. ASVD scales column j by d_j = (mean |x_j|)^α before the SVD,
truncates W·D, and folds D⁻¹ back into the first factor: W ≈ U_r Σ_r (V_rᵀ D⁻¹), so the
truncation error lands on columns whose inputs are small. α = 0.5 is the paper's choice
(§3.2, Fig. 4: perplexity is flat from 0.25 to 1 and best near 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.registry import StepContext, StepOutcome, register
from slimline.factorize.base import Decompose, FactorStats, LowRankConfig, factorize_layers
from slimline.factorize.decomposition import Decomposition, decompose_transformed
from slimline.search.ranges import FloatRange, SearchSpace

# A channel that never fired would get d_j = 0, a singular D, and its column of W could not
# be rebuilt: scales are floored at this fraction of the largest (the column is then nearly
# free to drop, as it should be).
_SCALE_FLOOR = 1e-6


@dataclass(frozen=True, kw_only=True)
class AsvdConfig(LowRankConfig):
    """ASVD: SVD of W·diag(mean|x|^alpha), the inverse scaling folded into the first factor."""

    method: ClassVar[str] = "asvd"
    needs_calibration: ClassVar[bool] = True
    uses_abs_mean: ClassVar[bool] = True
    summary: ClassVar[str] = "activation-aware SVD: columns scaled by mean|x|^α before truncation"
    paper: ClassVar[str] = "ASVD, arXiv 2312.05821"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"ratio": FloatRange(0.2, 0.9, step=0.05)}

    # The paper's α (§3.2): 0.5 balances outlier channels against the rest.
    alpha: float = 0.5

    def check(self) -> None:
        super().check()
        if not 0.0 < self.alpha <= 2.0:
            self.fail("alpha", f"{self.alpha} is outside (0, 2]")


def asvd_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """d (K,) = (mean |x_j|)^α, floored at ``_SCALE_FLOOR`` of the largest."""
    d = abs_mean.double().pow(alpha)
    return d.clamp_min(_SCALE_FLOOR * float(d.max().clamp_min(1e-300)))


def asvd_decompose_scaled(weight: torch.Tensor, scales: torch.Tensor) -> Decomposition:
    """W (N, K) = U Σ (Vᵀ D⁻¹) from the SVD of W·D, D = diag(``scales`` (K,))."""
    d = scales.double().to(weight.device)
    return decompose_transformed(weight, weight.double() * d[None, :])


def asvd_decomposer(alpha: float) -> Decompose:
    """The ASVD decomposition with exponent ``alpha``, reading the layer's mean |x|."""

    def decompose(weight: torch.Tensor, stats: FactorStats | None) -> Decomposition:
        if stats is None:
            raise ValueError("asvd needs calibration data")
        return asvd_decompose_scaled(weight, asvd_scales(stats.abs_mean, alpha))

    return decompose


@register(AsvdConfig)
def apply_asvd(model: nn.Module, cfg: AsvdConfig, ctx: StepContext) -> StepOutcome:
    return factorize_layers(model, cfg, ctx, asvd_decomposer(cfg.alpha))
