"""``svd_llm``: truncation-aware data whitening (Wang et al., arXiv 2403.07378).

With S the Cholesky factor of X Xᵀ (X (K, tokens) the layer's calibration inputs, so
X Xᵀ = S Sᵀ), S⁻¹X has orthonormal rows. Truncating the SVD of the whitened W·S = U Σ Vᵀ and
mapping back, W' = U_r Σ_r V_rᵀ S⁻¹, gives an output error
‖(W − W')X‖_F = ‖(W S − U_r Σ_r V_rᵀ) S⁻¹X‖_F = (Σ_{i>r} σ_i²)^½:
each dropped singular value costs exactly its own magnitude (the paper's Theorem 3.2), so the
smallest ones are the right ones to drop — unlike ASVD's heuristic scaling.

X Xᵀ is rank-deficient whenever the calibration set has fewer tokens than inputs, or a
channel is dead; the reference code then fails in its Cholesky. Here the factorization is
done in float64 and a jitter λ·I (λ from 1e-10 of the mean diagonal up, ×10 each try) is added
until it succeeds; the result is then exact for X Xᵀ + λI.
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

_FIRST_JITTER = 1e-10  # relative to the mean diagonal of X Xᵀ
_JITTER_TRIES = 12


@dataclass(frozen=True, kw_only=True)
class SvdLlmConfig(LowRankConfig):
    """SVD-LLM: SVD of W·S, S = chol(X Xᵀ), truncated, S⁻¹ folded into the first factor."""

    method: ClassVar[str] = "svd_llm"
    needs_calibration: ClassVar[bool] = True
    uses_hessian: ClassVar[bool] = True
    summary: ClassVar[str] = "truncation-aware whitening (Cholesky of XXᵀ), then truncated SVD"
    paper: ClassVar[str] = "SVD-LLM, arXiv 2403.07378"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"ratio": FloatRange(0.2, 0.9, step=0.05)}


def whitening_factor(xxt: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower-triangular S (K, K), float64, with S Sᵀ = X Xᵀ + λI, and the jitter λ used.

    λ = 0 when ``xxt`` (K, K) is positive definite; otherwise the least of
    1e-10·mean(diag), ×10 per try, that makes the Cholesky factorization succeed.
    """
    h = xxt.double()
    h = (h + h.t()) / 2
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    scale = float(torch.diagonal(h).mean().clamp_min(1e-300))
    jitter = 0.0
    for attempt in range(_JITTER_TRIES + 1):
        factor, info = torch.linalg.cholesky_ex(h + jitter * eye)
        if int(info) == 0:
            return factor, jitter
        jitter = scale * _FIRST_JITTER * 10.0**attempt
    raise ValueError(f"svd_llm: X Xᵀ is not positive definite even with jitter {jitter:.3g}")


def svd_llm_decompose_whitened(weight: torch.Tensor, factor: torch.Tensor) -> Decomposition:
    """W (N, K) = U Σ (Vᵀ S⁻¹) from the SVD of W·S, S = ``factor`` (K, K) lower-triangular."""
    return decompose_transformed(weight, weight.double() @ factor.double().to(weight.device))


def svd_llm_decompose(weight: torch.Tensor, stats: FactorStats | None) -> Decomposition:
    """The SVD-LLM decomposition of ``weight`` from its layer's input statistics."""
    return svd_llm_decomposer([])(weight, stats)


def svd_llm_decomposer(jitters: list[float]) -> Decompose:
    """The SVD-LLM decomposition, appending each layer's jitter λ to ``jitters``."""

    def decompose(weight: torch.Tensor, stats: FactorStats | None) -> Decomposition:
        if stats is None:
            raise ValueError("svd_llm needs calibration data")
        factor, jitter = whitening_factor(stats.xxt)
        jitters.append(jitter)
        return svd_llm_decompose_whitened(weight, factor)

    return decompose


@register(SvdLlmConfig)
def apply_svd_llm(model: nn.Module, cfg: SvdLlmConfig, ctx: StepContext) -> StepOutcome:
    jitters: list[float] = []
    outcome = factorize_layers(model, cfg, ctx, svd_llm_decomposer(jitters))
    jittered = sum(j > 0 for j in jitters)
    if jittered:
        outcome.notes.append(
            f"X Xᵀ was not positive definite in {jittered} of {len(jitters)} Cholesky "
            "factorizations (one per layer and pass; fewer calibration tokens than inputs, or "
            f"dead channels): jitter up to {max(jitters):.3g} added"
        )
    return outcome
