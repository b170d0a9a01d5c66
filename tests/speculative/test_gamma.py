"""The draft length: the expected-tokens formula against a simulation of rounds, and the
choice of γ against a brute-force search on simulated rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimline.speculative.decode import Gamma
from slimline.speculative.gamma import (
    PROBE_EVERY,
    adaptive_gamma,
    best_gamma,
    expected_tokens,
    token_cost,
)
from slimline.speculative.stats import SpeculativeStats


def _simulate(alpha: float, gamma: int, rounds: int, g: torch.Generator) -> torch.Tensor:
    """Tokens emitted per round: drafts kept until the first rejection, plus one."""
    accepted = torch.rand(rounds, gamma, generator=g, dtype=torch.float64) < alpha
    return accepted.to(torch.int64).cumprod(dim=1).sum(dim=1).double() + 1


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [1, 4, 9])
def test_expected_tokens_matches_simulated_rounds(alpha: float, gamma: int) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = _simulate(alpha, gamma, 20000, g)
    # 6 standard errors of the mean of a variable in [1, γ + 1] (Chebyshev: p < 0.03).
    bound = 6 * gamma / 2 / math.sqrt(tokens.numel()) + 1e-12
    assert abs(float(tokens.mean()) - expected_tokens(alpha, gamma)) <= bound


def test_best_gamma_maximises_simulated_speed() -> None:
    """Brute force: for each γ, simulated tokens per unit cost (γ·c + 1 per round); the γ
    chosen must be within simulation noise of the best one."""
    g = torch.Generator().manual_seed(1)
    for alpha, cost in [(0.5, 0.1), (0.8, 0.05), (0.9, 0.2), (0.3, 0.5)]:
        speeds = {gam: float(_simulate(alpha, gam, 20000, g).mean()) / (gam * cost + 1)
                  for gam in range(1, 13)}  # fmt: skip
        chosen = best_gamma(alpha, cost, 12)
        assert speeds[chosen] >= max(speeds.values()) * 0.98, (alpha, cost, speeds, chosen)


def test_best_gamma_edges() -> None:
    assert best_gamma(0.9, 0.0, 8) == 8  # free drafts: as many as allowed
    assert best_gamma(0.0, 0.1, 8) == 1  # nothing is ever accepted
    with pytest.raises(ValueError, match="alpha"):
        best_gamma(1.5, 0.1, 4)


def test_adaptive_gamma_starts_at_gamma_then_follows_the_measurements() -> None:
    stats = SpeculativeStats()
    assert adaptive_gamma(stats, 5, 16) == 5
    for _ in range(50):  # every draft kept, drafting nearly free
        stats.record_round(4, 4, 5, draft_s=0.001, verify_s=1.0)
    assert adaptive_gamma(stats, 5, 16) == 16
    stats.reset()
    for _ in range(50):  # every first draft rejected
        stats.record_round(4, 0, 1, draft_s=0.4, verify_s=1.0)
    assert adaptive_gamma(stats, 5, 16) == 0  # no draft pays: plain decode


def test_verify_cost_is_the_least_squares_line() -> None:
    """Rounds whose verify time is exactly v0 + u·k give back (v0, u); numpy's fit agrees on
    noisy times; one draft length alone gives the mean and no slope."""
    stats = SpeculativeStats()
    for k in [0, 1, 3, 5, 5, 2]:
        stats.record_round(k, 0, 1, draft_s=0.0, verify_s=0.033 + 0.018 * k)
    assert stats.verify_cost == pytest.approx((0.033, 0.018))
    g = torch.Generator().manual_seed(2)
    ks = torch.randint(0, 7, (40,), generator=g)
    times = 0.03 + 0.01 * ks + 0.002 * torch.rand(40, generator=g, dtype=torch.float64)
    stats.reset()
    for k, t in zip(ks.tolist(), times.tolist(), strict=True):
        stats.record_round(k, 0, 1, draft_s=0.0, verify_s=t)
    slope, intercept = np.polyfit(ks.double().numpy(), times.numpy(), 1)
    assert stats.verify_cost == pytest.approx((intercept, slope), rel=1e-9)
    stats.reset()
    for _ in range(3):
        stats.record_round(4, 0, 1, draft_s=0.0, verify_s=0.1)
    assert stats.verify_cost == pytest.approx((0.1, 0.0))


def test_gamma_zero_when_verifying_drafts_costs_more_than_they_bring() -> None:
    """Free drafts (prompt lookup), rarely accepted, each costing 0.55 of a one-token verify
    forward (llama-1b-random's measured growth): the best γ is 0, as brute force over the
    formula says; cheap verification of the same drafts keeps γ ≥ 1."""
    stats = SpeculativeStats()
    for i in range(40):
        k = 0 if i % 2 else 3
        stats.record_round(k, int(k and i % 10 == 0), 1 + int(k and i % 10 == 0), draft_s=0.0,
                           verify_s=0.033 + 0.018 * k)
    c = token_cost(stats)
    assert c == pytest.approx(0.018 / 0.033)
    brute = max(range(17), key=lambda g: (expected_tokens(stats.alpha, g) / (g * c + 1), -g))
    assert adaptive_gamma(stats, 5, 16) == brute == 0
    stats.reset()
    for i in range(40):
        k = 0 if i % 2 else 3
        stats.record_round(k, 2 if k else 0, 3 if k else 1, draft_s=0.0,
                           verify_s=0.033 + 0.0005 * k)
    assert adaptive_gamma(stats, 5, 16) >= 1


def test_plain_rounds_probe_with_one_draft() -> None:
    gamma = Gamma(5, adaptive=True, max_gamma=16)
    for _ in range(30):  # every draft rejected, verification expensive
        gamma.running.record_round(3, 0, 1, draft_s=0.0, verify_s=0.09)
        gamma.running.record_round(0, 0, 1, draft_s=0.0, verify_s=0.03)
    picks = [gamma.next() for _ in range(3 * PROBE_EVERY)]
    assert picks == ([0] * (PROBE_EVERY - 1) + [1]) * 3
