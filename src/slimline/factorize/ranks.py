"""Rank arithmetic of a factorized (N, K) matrix: what a rank costs, and which rank to take.

A rank-r factorization B (N, r) · A (r, K) stores r·(N + K) weights against N·K, so it saves
parameters only below the break-even rank N·K / (N + K) — half the smaller side for a square
matrix, which is why low-rank methods are often quoted at ratios, not ranks.
"""

from __future__ import annotations

import math

import torch


def factor_params(n: int, k: int, rank: int) -> int:
    """Weights of a rank-``rank`` factorization of an (n, k) matrix: r·(n + k)."""
    return rank * (n + k)


def break_even_rank(n: int, k: int) -> float:
    """The rank at which factorizing an (n, k) matrix stops saving weights: n·k / (n + k)."""
    return n * k / (n + k)


def max_saving_rank(n: int, k: int) -> int:
    """The largest rank that stores fewer weights than the dense (n, k) matrix (0 if none)."""
    return math.ceil(break_even_rank(n, k)) - 1


def rank_for_ratio(n: int, k: int, ratio: float) -> int:
    """The largest rank storing at most ``ratio`` of the dense (n, k) weights (0 if none)."""
    return math.floor(ratio * n * k / (n + k))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The least r with Σ_{i<r} σ_i² ≥ ``energy`` · Σ σ_i² (σ sorted descending)."""
    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(torch.finfo(torch.float64).tiny)
    # The 1e-12 slack keeps energy 1.0 from asking for the rounding error of the tail.
    return min(int((kept < energy - 1e-12).sum()) + 1, power.numel())


def candidate_ranks(n: int, k: int, extra: tuple[int, ...] = (), count: int = 32) -> list[int]:
    """Up to ``count`` ranks spread over [1, max saving rank], plus ``extra`` (sorted, unique)."""
    top = max_saving_rank(n, k)
    grid = torch.linspace(1, max(top, 1), min(count, max(top, 1))).round().long().tolist()
    return sorted({r for r in (*grid, *extra) if 1 <= r <= top})
