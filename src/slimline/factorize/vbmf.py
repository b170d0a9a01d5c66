"""Rank estimation by empirical variational Bayesian matrix factorization (EVBMF).

Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14 (2013): for Y (L, M), L ≤ M, observed as a low-rank
signal plus i.i.d. Gaussian noise of variance σ², the empirical VB solution keeps exactly the
singular values above

    γ_EVB = σ √(M (1 + τ̄)(1 + α/τ̄)),   α = L / M,

where τ̄ is the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(z + 1)/z − ½ (τ̄ = 2.5129 at α = 1). The
noise variance σ² itself is estimated by minimising the free energy over σ² alone, on a
bracket known in closed form (Nakajima et al., "Condition for perfect dimensionality recovery
by variational Bayesian PCA", JMLR 16, 2015).
Kim et al. (arXiv 1511.06530) use it to choose Tucker ranks of convolution kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VbmfEstimate:
    """The estimated rank and noise variance of a matrix."""

    rank: int
    sigma2: float
    threshold: float  # γ_EVB: singular values above it are kept


def tau_bar(alpha: float) -> float:
    """τ̄(α): the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(1 + z)/z − ½ (decreasing in τ)."""
    from scipy.optimize import brentq

    def phi(z: float) -> float:
        return math.log1p(z) / z - 0.5

    return float(brentq(lambda t: phi(t) + phi(t / alpha), 1e-9, 1e9, xtol=1e-14, rtol=1e-14))


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ(x; α) = ½ (x − (1 + α) + √((x − (1 + α))² − 4α)), for x above the threshold."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + torch.sqrt((b * b - 4.0 * alpha).clamp_min(0.0)))


def free_energy(sigma2: float, values: torch.Tensor, m: int, alpha: float, x_bar: float) -> float:
    """The EVB free energy (up to constants) at noise variance ``sigma2``, given the L
    singular values ``values`` of Y (L, M): Σ_h ψ(γ_h²/(Mσ²)), ψ(x) = x − log x, plus
    log(τ + 1) + α log(τ/α + 1) − τ where x > x̄ (a component is kept)."""
    x = values.double().pow(2) / (m * sigma2)
    total = (x - torch.log(x)).sum()
    kept = x[x > x_bar]
    if kept.numel():
        tau = _tau(kept, alpha)
        total = total + (torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau).sum()
    return float(total)


def evbmf(y: torch.Tensor) -> VbmfEstimate:
    """The EVBMF rank and noise variance of ``y`` (L, M), either orientation."""
    from scipy.optimize import minimize_scalar

    mat = y.double()
    if mat.shape[0] > mat.shape[1]:
        mat = mat.t()
    big_l, m = mat.shape  # L ≤ M
    alpha = big_l / m
    values = torch.linalg.svdvals(mat)  # (L,) descending
    t_bar = tau_bar(alpha)
    x_bar = (1.0 + t_bar) * (1.0 + alpha / t_bar)
    power = values.pow(2)
    upper = float(power.sum()) / (big_l * m)
    # At most h_max components can be kept; the rest bound σ² from below.
    h_max = min(math.ceil(big_l / (1.0 + alpha)) - 1, big_l - 1)
    lower = max(float(power[h_max]) / (m * x_bar), float(power[h_max:].mean()) / m)
    if upper <= 0.0:
        return VbmfEstimate(0, 0.0, 0.0)
    if lower >= upper:
        sigma2 = upper
    else:
        found = minimize_scalar(lambda s: free_energy(s, values, m, alpha, x_bar),
                                bounds=(lower, upper), method="bounded",
                                options={"xatol": 1e-12 * upper})
        sigma2 = float(found.x)
    threshold = math.sqrt(m * sigma2 * x_bar)
    return VbmfEstimate(int((values > threshold).sum()), sigma2, threshold)
