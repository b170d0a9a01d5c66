"""How many tokens to draft per round: fixed, or chosen from the running acceptance rate.

Leviathan et al. (arXiv 2211.17192, §3.3–3.4) model each drafted token as accepted with
probability ``α``, independently. A round of ``γ`` drafts then emits
``(1 − α^{γ+1}) / (1 − α)`` tokens on average (their Eq. 1) and costs ``γ·c + 1`` target
forwards, where ``c`` is the cost of one draft step relative to one verify forward; the
expected speed-up is the ratio (their Theorem 3.8), and the best ``γ`` maximises it. The
model takes the verify forward's cost as independent of ``γ``, which holds while decode is
memory-bound (a few more tokens per forward read the same weights).
"""

from __future__ import annotations

from slimline.speculative.stats import SpeculativeStats


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one round of ``gamma`` drafts emits on average: Σ_{i=0}^{γ} α^i (Eq. 1)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup(alpha: float, gamma: int, cost: float) -> float:
    """Expected tokens per unit of target-forward time (Theorem 3.8)."""
    return expected_tokens(alpha, gamma) / (gamma * cost + 1.0)


def best_gamma(alpha: float, cost: float, max_gamma: int) -> int:
    """The ``γ`` in [1, max_gamma] with the highest :func:`speedup` (the smallest on ties)."""
    if not 0.0 <= alpha <= 1.0 or cost < 0.0 or max_gamma < 1:
        raise ValueError(f"need alpha in [0, 1], cost >= 0, max_gamma >= 1; got {alpha}, "
                         f"{cost}, {max_gamma}")
    scores = [(speedup(alpha, g, cost), -g) for g in range(1, max_gamma + 1)]
    return -max(scores)[1]


def adaptive_gamma(stats: SpeculativeStats, gamma: int, max_gamma: int) -> int:
    """The next round's draft length: ``gamma`` until a round was measured, then
    :func:`best_gamma` at the measured ``α`` (:attr:`SpeculativeStats.alpha`) and draft cost
    (:attr:`SpeculativeStats.draft_cost`)."""
    if stats.rounds == 0:
        return gamma
    return best_gamma(stats.alpha, stats.draft_cost, max_gamma)
