"""The draft length: the expected-tokens formula against a simulation of rounds, and the
choice of γ against a brute-force search on simulated rounds."""

from __future__ import annotations

import math

import pytest
import torch

from slimline.speculative.gamma import adaptive_gamma, best_gamma, expected_tokens
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
    assert adaptive_gamma(stats, 5, 16) == 1
