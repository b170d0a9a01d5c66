"""EVBMF (Nakajima et al. 2013): recovers the rank and noise of a low-rank-plus-noise matrix,
and its noise variance minimises the free energy (checked on a fine grid)."""

from __future__ import annotations

import math

import pytest
import torch

from slimline.factorize.vbmf import evbmf, free_energy, tau_bar


def _low_rank_plus_noise(big_l: int, m: int, rank: int, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(big_l, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    signal = torch.linspace(9, 3, rank, dtype=torch.float64) * sigma * math.sqrt(m)
    return u @ torch.diag(signal) @ v.t() + sigma * torch.randn(big_l, m, generator=g,
                                                                dtype=torch.float64)


@pytest.mark.parametrize(("big_l", "m", "rank", "sigma"),
                         [(40, 100, 3, 0.5), (64, 64, 5, 1.0), (30, 300, 8, 0.2)])
def test_recovers_rank_and_noise(big_l: int, m: int, rank: int, sigma: float) -> None:
    y = _low_rank_plus_noise(big_l, m, rank, sigma, seed=rank)
    found = evbmf(y)
    assert found.rank == rank
    assert found.sigma2 == pytest.approx(sigma**2, rel=0.1)
    assert evbmf(y.t()).rank == rank  # either orientation


def test_pure_noise_has_rank_zero() -> None:
    y = torch.randn(50, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert evbmf(y).rank == 0


def test_tau_bar_at_square_matrices() -> None:
    # α = 1: log(1 + τ)/τ = 1/2, the 2.5129 of the paper.
    assert tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)


def test_noise_variance_minimises_the_free_energy() -> None:
    y = _low_rank_plus_noise(40, 100, 3, 0.5, seed=7)
    found = evbmf(y)
    values = torch.linalg.svdvals(y)
    alpha = 40 / 100
    t = tau_bar(alpha)
    x_bar = (1 + t) * (1 + alpha / t)
    grid = torch.linspace(found.sigma2 * 0.5, found.sigma2 * 1.5, 2001).tolist()
    best = min(free_energy(s, values, 100, alpha, x_bar) for s in grid)
    assert free_energy(found.sigma2, values, 100, alpha, x_bar) <= best + 1e-6
