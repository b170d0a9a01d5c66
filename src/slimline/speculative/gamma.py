"""How many tokens to draft per round: fixed, or chosen from the running acceptance rate.

Leviathan et al. (arXiv 2211.17192, §3.3–3.4) model each drafted token as accepted with
probability ``α``, independently. A round of ``γ`` drafts then emits
``(1 − α^{γ+1}) / (1 − α)`` tokens on average (their Eq. 1) and costs ``γ·c + 1`` target
forwards, where ``c`` is the cost of one draft step relative to one verify forward; the
expected speed-up is the ratio (their Theorem 3.8), and the best ``γ`` maximises it. The
model takes the verify forward's cost as independent of ``γ``, which holds while decode is
memory-bound (a few more tokens per forward read the same weights).

Where it does not hold — a verify forward of ``γ + 1`` tokens costing ``v0 + γ·u`` — each
drafted token costs ``c = (d + u) / v0`` (``d``: drafting it), both measured
(:attr:`SpeculativeStats.verify_cost`), and ``γ = 0`` (plain decode, speed-up 1) is a
candidate: at a low acceptance rate no draft length pays. Rounds at ``γ = 0`` measure no
acceptance, so every :data:`PROBE_EVERY`-th of them drafts one token to keep ``α`` current.
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


# At γ = 0, one round in this many drafts one token anyway, to measure α again.
PROBE_EVERY = 8


def best_gamma(alpha: float, cost: float, max_gamma: int, min_gamma: int = 1) -> int:
    """The ``γ`` in [min_gamma, max_gamma] with the highest :func:`speedup` (the smallest on
    ties; ``γ = 0`` is plain decode, speed-up 1)."""
    if not 0.0 <= alpha <= 1.0 or cost < 0.0 or not 0 <= min_gamma <= max_gamma or max_gamma < 1:
        raise ValueError(f"need alpha in [0, 1], cost >= 0, 0 <= min_gamma <= max_gamma, "
                         f"max_gamma >= 1; got {alpha}, {cost}, {min_gamma}, {max_gamma}")
    scores = [(speedup(alpha, g, cost), -g) for g in range(min_gamma, max_gamma + 1)]
    return -max(scores)[1]


def token_cost(stats: SpeculativeStats) -> float:
    """``c``: what one more drafted token costs (drafting it and verifying it), over a
    verify forward without drafts, from the measured rounds."""
    v0, u = stats.verify_cost
    if v0 <= 0.0:
        return 0.0
    d = stats.draft_seconds / stats.drafted if stats.drafted else 0.0
    return (d + u) / v0


def adaptive_gamma(stats: SpeculativeStats, gamma: int, max_gamma: int) -> int:
    """The next round's draft length: ``gamma`` until a round was measured, then
    :func:`best_gamma` over [0, max_gamma] at the measured ``α``
    (:attr:`SpeculativeStats.alpha`) and per-token cost (:func:`token_cost`)."""
    if stats.rounds == 0:
        return gamma
    return best_gamma(stats.alpha, token_cost(stats), max_gamma, min_gamma=0)
