"""Quality metrics against brute-force references (loops and textbook formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimline.evaluate import metrics as M


def _lm_batch(batch: int = 3, tokens: int = 7, vocab: int = 11, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tokens, vocab, generator=g)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    return logits, ids, mask


def _brute_nll(logits, ids, mask) -> tuple[float, int]:
    """Loop over every (item, position): one cross_entropy call per scored token."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                total += F.cross_entropy(logits[b, t][None], ids[b, t + 1][None]).item()
                count += 1
    return total, count


def test_next_token_nll_matches_per_token_cross_entropy() -> None:
    logits, ids, mask = _lm_batch()
    total, count = M.next_token_nll(logits, ids, mask)
    ref_total, ref_count = _brute_nll(logits, ids, mask)
    assert count == ref_count == 3 + 4 + 6  # pairs with both tokens real, per item
    assert total == pytest.approx(ref_total, rel=1e-6)


def test_next_token_nll_without_mask_scores_every_pair() -> None:
    logits, ids, _ = _lm_batch()
    total, count = M.next_token_nll(logits, ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert count == 3 * 6
    assert total / count == pytest.approx(ref.item(), rel=1e-6)


def test_perplexity_is_token_weighted_across_batches() -> None:
    """Two batches of different sizes combine exactly like one concatenated batch."""
    a, b = _lm_batch(seed=1), _lm_batch(batch=5, seed=2)
    mean = M.Mean()
    mean.add(M.next_token_nll(*a))
    mean.add(M.next_token_nll(*b))
    joined = M.next_token_nll(*(torch.cat([x, y]) for x, y in zip(a, b, strict=True)))
    assert mean.total == pytest.approx(joined[0], rel=1e-9)
    assert mean.count == joined[1]
    assert M.perplexity(mean.total, mean.count) == pytest.approx(math.exp(joined[0] / joined[1]))


def test_perplexity_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no token"):
        M.perplexity(0.0, 0)


def test_accuracy_counts_and_ignore_index() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 1, -100, 0])
    assert M.accuracy_counts(scores, labels) == (2, 3)


def test_accuracy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        M.accuracy_counts(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_cosine_matches_per_item_formula() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    total, count = M.cosine_sum(a, b)
    ref = [float(x @ y / (x.norm() * y.norm())) for x, y in zip(a, b, strict=True)]
    assert count == 6
    assert total / count == pytest.approx(sum(ref) / 6, rel=1e-6)


def test_cosine_of_token_logits_flattens_per_item_and_drops_padding() -> None:
    logits, _, mask = _lm_batch()
    other = logits + 0.3 * torch.randn_like(logits)
    total, count = M.cosine_sum(logits, other, mask)
    ref = []
    for b in range(3):
        keep = mask[b].bool()
        x, y = logits[b, keep].flatten(), other[b, keep].flatten()
        ref.append(float(F.cosine_similarity(x, y, dim=0)))
    assert count == 3
    assert total / count == pytest.approx(sum(ref) / 3, rel=1e-5)


def test_cosine_of_an_output_with_itself_is_one() -> None:
    x = torch.randn(4, 5, 9)
    total, count = M.cosine_sum(x, x.clone())
    assert total / count == pytest.approx(1.0, abs=1e-12)


def test_kl_matches_textbook_sum() -> None:
    logits, _, mask = _lm_batch()
    other = logits + torch.randn_like(logits)
    total, count = M.kl_sum(logits, other, mask)
    ref, n = 0.0, 0
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                p, q = logits[b, t].softmax(-1).double(), other[b, t].softmax(-1).double()
                ref += float((p * (p / q).log()).sum())
                n += 1
    assert count == n == int(mask.sum())
    assert total / count == pytest.approx(ref / n, rel=1e-5)
    # and the library's own KL, as a second outside reference
    torch_kl = F.kl_div(other.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                        reduction="none").sum(-1)
    assert total == pytest.approx(float(torch_kl[mask.bool()].sum()), rel=1e-5)


def test_kl_of_a_distribution_with_itself_is_zero() -> None:
    x = torch.randn(5, 10)
    total, count = M.kl_sum(x, x.clone())
    assert count == 5
    assert total == pytest.approx(0.0, abs=1e-6)


def test_agreement_counts_equal_argmax_per_position() -> None:
    logits, _, mask = _lm_batch()
    other = logits + 0.8 * torch.randn_like(logits)
    same, count = M.agreement_counts(logits, other, mask)
    ref = sum(
        int(logits[b, t].argmax() == other[b, t].argmax())
        for b in range(3) for t in range(7) if mask[b, t]
    )
    assert (same, count) == (ref, int(mask.sum()))
    assert M.agreement_counts(logits, logits, mask) == (count, count)


def test_shift_for_next_token_aligns_with_labels() -> None:
    scores, labels = torch.randn(2, 5, 4), torch.arange(10).view(2, 5) % 4
    shifted, targets = M.shift_for_next_token(scores, labels)
    assert shifted.shape == (2, 4, 4)
    assert torch.equal(targets, labels[:, 1:])
