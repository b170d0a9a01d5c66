"""The acceptance rules: greedy prefix matching, and the rejection step of speculative sampling
checked statistically against the target distribution it must reproduce (arXiv 2211.17192)."""

from __future__ import annotations

import math

import pytest
import torch

from slimline.speculative.accept import accept_greedy, accept_sampled, one_hot_rows, residual

# Probability that a correct implementation fails one of the bounds below.
DELTA = 1e-6


def l1_bound(n: int, vocab: int, delta: float = DELTA) -> float:
    """With probability >= 1 − δ, ||p̂ − p||_1 <= sqrt((V − 1)/n) + sqrt(2 ln(1/δ)/n) for the
    empirical distribution p̂ of n draws from p: E||p̂ − p||_1 <= Σ sqrt(p_i(1 − p_i)/n)
    <= sqrt((V − 1)/n) (Cauchy–Schwarz), and one draw moves ||p̂ − p||_1 by at most 2/n
    (McDiarmid)."""
    return math.sqrt((vocab - 1) / n) + math.sqrt(2 * math.log(1 / delta) / n)


def hoeffding(n: int, delta: float = DELTA) -> float:
    """|mean − expectation| of n draws in [0, 1] exceeds this with probability <= δ."""
    return math.sqrt(math.log(2 / delta) / (2 * n))


def _empirical(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=vocab).double() / len(
        tokens)


def test_greedy_keeps_the_longest_agreeing_prefix() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        k = int(torch.randint(0, 6, (1,), generator=g))
        draft = torch.randint(0, 3, (k,), generator=g)
        target = torch.randint(0, 3, (k + 1,), generator=g)
        expected = 0
        while expected < k and int(draft[expected]) == int(target[expected]):
            expected += 1
        assert accept_greedy(draft, target) == expected


def test_greedy_checks_lengths() -> None:
    with pytest.raises(ValueError, match="k \\+ 1"):
        accept_greedy(torch.tensor([1, 2]), torch.tensor([1, 2]))


def _distributions(g: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    return torch.softmax(2.0 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)


def test_rejection_step_emits_the_target_distribution_at_every_position() -> None:
    """Drafts from q, two positions: the first emitted token follows p_1, and the token
    emitted at position 2 (in the rounds that reach it) follows p_2; the first draft is kept
    with probability Σ min(p_1, q_1) = 1 − TV(p_1, q_1) (the paper's α, Corollary 3.6)."""
    g = torch.Generator().manual_seed(0)
    vocab, k, n = 6, 2, 6000
    p, q = _distributions(g, k + 1, vocab), _distributions(g, k, vocab)
    first, second, kept_first = [], [], 0
    for _ in range(n):
        draft = torch.multinomial(q, 1, generator=g).flatten()  # (k,), one per position
        kept, token = accept_sampled(draft, p, q, g)
        emitted = [*draft[:kept].tolist(), token]
        first.append(emitted[0])
        kept_first += kept >= 1
        if len(emitted) >= 2:
            second.append(emitted[1])
    assert float((_empirical(first, vocab) - p[0]).abs().sum()) <= l1_bound(n, vocab)
    assert float((_empirical(second, vocab) - p[1]).abs().sum()) <= l1_bound(len(second), vocab)
    alpha = float(torch.minimum(p[0], q[0]).sum())
    assert abs(kept_first / n - alpha) <= hoeffding(n)


def test_rejection_step_with_a_deterministic_draft() -> None:
    """Prompt lookup drafts one fixed token (q a point mass): it is kept with probability
    p(d), and the emitted token still follows p."""
    g = torch.Generator().manual_seed(1)
    vocab, n = 5, 6000
    p = _distributions(g, 2, vocab)
    draft = torch.tensor([3])
    q = one_hot_rows(draft, vocab, p.dtype)
    tokens, kept = [], 0
    for _ in range(n):
        accepted, token = accept_sampled(draft, p, q, g)
        tokens.append(3 if accepted else token)
        kept += accepted
    assert float((_empirical(tokens, vocab) - p[0]).abs().sum()) <= l1_bound(n, vocab)
    assert abs(kept / n - float(p[0, 3])) <= hoeffding(n)


def test_equal_draft_and_target_keep_everything() -> None:
    g = torch.Generator().manual_seed(2)
    p = _distributions(g, 4, 7)
    for _ in range(200):
        draft = torch.multinomial(p[:3], 1, generator=g).flatten()
        kept, _ = accept_sampled(draft, p, p[:3].clone(), g)
        assert kept == 3


def test_residual_is_the_normalised_positive_part() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.4, 0.1, 0.3])
    torch.testing.assert_close(residual(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual(p, p), p)  # p <= q everywhere: nothing to resample


def test_rejection_step_checks_shapes() -> None:
    p = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="k \\+ 1"):
        accept_sampled(torch.tensor([0, 1]), p, p)


def test_greedy_judging_through_processors_keeps_what_full_scoring_keeps() -> None:
    """With logits processors, greedy judging stops scoring at the first rejected draft; it
    keeps the drafts and emits the token that scoring every position and ``accept_greedy``
    give, and scores no position past the rejection."""
    from slimline.speculative.decode import Proposal, Scorer, judge

    scored: list[int] = []

    def processors(prefix: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scored.append(prefix.shape[1])
        out = scores.clone()
        out[:, int(prefix[0, -1]) % scores.shape[1]] -= 0.5  # depends on the prefix
        return out

    scorer = Scorer(processors, sampling=False, plain=False)
    g = torch.Generator().manual_seed(0)
    prefix = torch.tensor([3, 1, 4])
    for trial in range(50):
        logits = torch.randn(5, 7, generator=g)
        # A draft that agrees with the target for a random number of positions.
        draft: list[int] = []
        for i in range(4):
            best = int(scorer.scores(torch.cat([prefix, torch.tensor(draft, dtype=torch.long)]),
                                     logits[i]).argmax())  # fmt: skip
            draft.append(best if torch.rand(1, generator=g) < 0.6 else (best + 1) % 7)
        tokens = torch.tensor(draft)
        full = torch.stack([
            scorer.scores(torch.cat([prefix, tokens[:i]]), logits[i]).argmax() for i in range(5)
        ])
        n_ref = accept_greedy(tokens, full)
        scored.clear()
        n, token = judge(scorer, logits, Proposal(tokens), prefix, vocab=7)
        assert (n, token) == (n_ref, int(full[n_ref])), trial
        assert len(scored) == n_ref + 1
