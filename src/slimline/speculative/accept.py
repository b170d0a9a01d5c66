"""Which drafted tokens the target keeps: pure functions on tensors.

One round of speculative decoding proposes ``k`` draft tokens ``d_1..d_k``; the target
scores the ``k + 1`` positions in one forward, giving its next-token distributions
``p_1..p_{k+1}`` (position ``i`` conditioned on the prefix and ``d_1..d_{i-1}``).

* **greedy**: keep the longest prefix of drafts equal to the target's argmax, then emit the
  target's own token at the first mismatch (or the bonus token ``argmax p_{k+1}`` when all
  were kept). The output is token for token the target's greedy output.
* **sampling** (Leviathan et al., arXiv 2211.17192, Algorithm 1; Chen et al., arXiv
  2302.01318): keep ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))``, where ``q_i`` is
  the distribution the draft was sampled from; at the first rejection emit a token drawn from
  ``norm(max(0, p_i − q_i))``; when all were kept, draw the bonus token from ``p_{k+1}``.
  Every emitted token is then distributed exactly as the target's ``p`` (their Theorem 3.5).
"""

from __future__ import annotations

import torch


def accept_greedy(draft: torch.Tensor, target: torch.Tensor) -> int:
    """How many drafts the target's greedy choices keep: (k,), (k + 1,) int → n in [0, k].

    ``target[i]`` is the target's argmax at position ``i``; the round emits
    ``draft[:n]`` then ``target[n]``.
    """
    if target.numel() != draft.numel() + 1:
        raise ValueError(f"target must hold k + 1 = {draft.numel() + 1} tokens, got "
                         f"{target.numel()}")
    agree = draft == target[: draft.numel()]  # (k,)
    return int(agree.to(torch.int64).cumprod(0).sum())


def accept_sampled(
    draft: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The rejection step of speculative sampling (arXiv 2211.17192, Algorithm 1).

    ``draft`` (k,) int: tokens sampled from ``q``; ``p`` (k + 1, V): the target's
    distributions; ``q`` (k, V): the draft's. Returns ``(n, token)``: the round emits
    ``draft[:n]`` then ``token``.
    """
    k = draft.numel()
    if p.shape[0] != k + 1 or q.shape != (k, p.shape[1]):
        raise ValueError(f"expected p (k + 1, V) and q (k, V) for k = {k}, got "
                         f"{tuple(p.shape)} and {tuple(q.shape)}")
    rows = torch.arange(k, device=draft.device)
    p_d, q_d = p[rows, draft], q[rows, draft]  # (k,)
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)
    # u < p/q, written without dividing: q_d > 0 for a token sampled from q.
    rejected = u * q_d >= p_d  # (k,)
    if not bool(rejected.any()):
        return k, sample(p[k], generator)
    n = int(rejected.to(torch.int64).argmax())
    return n, sample(residual(p[n], q[n]), generator)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p − q))`` (V,): what a rejection resamples from; ``p`` where p ≤ q
    everywhere (then the rejection had probability 0, reached only by rounding)."""
    rest = (p - q).clamp_min(0)
    total = rest.sum()
    return rest / total if float(total) > 0 else p


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token drawn from ``probs`` (V,)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def one_hot_rows(tokens: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(k,) tokens → (k, V) point masses: the ``q`` of a deterministic draft (prompt lookup),
    for which the rejection step keeps ``d`` with probability ``p(d)``."""
    out = torch.zeros(tokens.numel(), vocab, dtype=dtype, device=tokens.device)
    return out.scatter_(1, tokens.view(-1, 1), 1.0)
