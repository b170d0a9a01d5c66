"""The speculative decoding loop: draft, verify in one forward, keep what the target agrees
with, roll the caches back (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv
2302.01318).

It runs as transformers' ``generate(custom_generate=...)`` decoding loop (a public hook since
transformers 5): ``generate`` itself resolves the generation config, builds the logits
processors (temperature, top-k/p, repetition penalty...) and stopping criteria (max length,
EOS, stop strings) and the KV cache (a ``kv_cache`` step's quantized one included); this loop
applies the very same processors to every verified position, with the prefix ``generate``
would have seen there, and asks the stopping criteria after every emitted token. So under
greedy decoding the output is the target's greedy output token for token, and under
sampling each token is distributed as ``generate`` would have sampled it.

Cache invariant between rounds: every cache holds at most ``len(seq) − 1`` tokens of the
committed sequence ``seq`` (its last token is still to be fed); a round feeds each model the
tokens its cache lacks, and afterwards every cache is cropped back to ``len(seq) − 1``.
A batch of several sequences is decoded one sequence after the other (left padding is
stripped, and given back in the output), which keeps this invariant per sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from slimline.quantize.qlinear import decode_rows
from slimline.speculative import hf
from slimline.speculative.accept import accept_greedy, accept_sampled, one_hot_rows
from slimline.speculative.gamma import PROBE_EVERY, adaptive_gamma
from slimline.speculative.layer_skip import skipping
from slimline.speculative.lookup import lookup_draft
from slimline.speculative.stats import SpeculativeStats


class Unsupported(Exception):
    """A ``generate`` call this loop does not cover; plain ``generate`` runs it instead."""


@dataclass
class Scorer:
    """Turns one position's logits into what ``generate`` would pick there: the logits
    processors applied with that position's prefix, then argmax or a sample."""

    processors: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sampling: bool
    plain: bool  # no processor at all: greedy picks are a plain argmax

    def scores(self, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(L,) prefix, (V,) float32 logits → (V,) processed scores."""
        if self.plain:
            return logits
        return self.processors(prefix.view(1, -1), logits.view(1, -1).clone())[0]

    def probs(self, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.scores(prefix, logits), dim=-1)

    def pick(self, prefix: torch.Tensor, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The token ``generate`` would take here and, when sampling, the distribution it
        was drawn from (V,)."""
        if not self.sampling:
            return int(self.scores(prefix, logits).argmax()), None
        probs = self.probs(prefix, logits)
        return int(torch.multinomial(probs, 1)), probs


@dataclass
class Proposal:
    """A round's draft: tokens (k,) and, when sampled, their distributions (k, V)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    def propose(self, seq: torch.Tensor, k: int, scorer: Scorer, head: torch.Tensor) -> Proposal:
        """Up to ``k`` tokens to follow ``seq`` (the row's left padding ``head`` precedes it)."""

    def rollback(self, length: int) -> None:
        """Forget everything past the first ``length`` tokens of the sequence."""


class Target:
    """The model being sped up, with its KV cache."""

    def __init__(self, model: nn.Module, cache: Any | None) -> None:
        self.model, self.cache = model, cache
        # A verify forward holds at most this many tokens: the decode kernels' row limit
        # where the model has them, so drafted positions run on plain decode's kernel.
        self.max_rows = decode_rows(model)

    def verify(self, seq: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
        """Logits (k + 1, V) at the last token of ``seq`` and at each of the ``k`` drafts."""
        fed = torch.cat([seq[hf.cache_length(self.cache):], draft])
        logits, self.cache = hf.run(self.model, fed, self.cache, keep=draft.numel() + 1)
        return logits

    def rollback(self, length: int) -> None:
        hf.crop_cache(self.cache, length)


def draft_autoregressively(
    run: Callable[[torch.Tensor], torch.Tensor], seq: torch.Tensor, k: int, scorer: Scorer,
    head: torch.Tensor, fed_from: int,
) -> Proposal:
    """``k`` tokens, one forward each: ``run(ids) -> logits (1, V)`` of the last fed token.
    The first forward feeds ``seq[fed_from:]`` (what the drafter's cache lacks)."""
    tokens: list[int] = []
    dists: list[torch.Tensor] = []
    feed = seq[fed_from:]
    for _ in range(k):
        logits = run(feed)[-1]
        prefix = torch.cat([head, seq, seq.new_tensor(tokens)])
        token, probs = scorer.pick(prefix, logits)
        tokens.append(token)
        if probs is not None:
            dists.append(probs)
        feed = seq.new_tensor([token])
    return Proposal(seq.new_tensor(tokens), torch.stack(dists) if dists else None)


class ModelDrafter:
    """A smaller model with the same vocabulary, on a KV cache of its own."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache = model, None

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.cache = hf.run(self.model, ids, self.cache, keep=1)
        return logits

    def propose(self, seq: torch.Tensor, k: int, scorer: Scorer, head: torch.Tensor) -> Proposal:
        return draft_autoregressively(self._run, seq, k, scorer, head, hf.cache_length(self.cache))

    def rollback(self, length: int) -> None:
        hf.crop_cache(self.cache, length)


class SelfDrafter:
    """The target itself with blocks ``skip`` passed through, on the target's own cache.

    The target's cache holds ``len(seq) − 1`` tokens when a round starts (the prefill, then
    each round's rollback leave it so);
    drafting appends to the kept layers only, and those entries are cropped again before the
    verify pass, which recomputes every layer at the drafted positions.
    """

    def __init__(self, target: Target, blocks: nn.ModuleList, skip: Sequence[int],
                 tuple_len: int) -> None:
        self.target, self.blocks, self.skip, self.tuple_len = target, blocks, skip, tuple_len

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.target.cache = hf.run(self.target.model, ids, self.target.cache, keep=1)
        return logits

    def propose(self, seq: torch.Tensor, k: int, scorer: Scorer, head: torch.Tensor) -> Proposal:
        have = hf.cache_length(self.target.cache)
        with skipping(self.blocks, self.skip, self.tuple_len):
            proposal = draft_autoregressively(self._run, seq, k, scorer, head, have)
        hf.crop_cache(self.target.cache, have)
        return proposal

    def rollback(self, length: int) -> None:
        """Nothing of its own: the target's cache is cropped by the target."""


@dataclass
class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier match of the last n-gram."""

    max_ngram: int

    def propose(self, seq: torch.Tensor, k: int, scorer: Scorer, head: torch.Tensor) -> Proposal:
        return Proposal(lookup_draft(seq, k, self.max_ngram))

    def rollback(self, length: int) -> None:
        """Nothing to forget: the draft is read from the sequence itself."""


@dataclass
class Limits:
    """When a row stops: ``generate``'s stopping criteria, and its max length (which also
    caps how much is drafted)."""

    stop: Callable[[torch.Tensor, Any], torch.Tensor]
    max_length: int


@dataclass
class Gamma:
    """The draft length per round (``adaptive``: from ``running``, see ``gamma.py``)."""

    gamma: int
    adaptive: bool
    max_gamma: int
    running: SpeculativeStats = field(default_factory=SpeculativeStats)
    idle: int = 0  # adaptive rounds in a row at γ = 0

    def next(self) -> int:
        if not self.adaptive:
            return self.gamma
        chosen = adaptive_gamma(self.running, self.gamma, self.max_gamma)
        if chosen > 0:
            self.idle = 0
            return chosen
        self.idle += 1
        if self.idle >= PROBE_EVERY:  # draft one token now and then: α may have changed
            self.idle = 0
            return 1
        return 0


def judge(
    scorer: Scorer, logits: torch.Tensor, proposal: Proposal, prefix: torch.Tensor, vocab: int
) -> tuple[int, int]:
    """``(n, token)``: how many drafts the target keeps, and the token it emits after them.
    ``prefix`` (L,) is what precedes the first verified position."""
    draft = proposal.tokens
    if not scorer.sampling and scorer.plain:
        picks = logits.argmax(dim=-1)  # (k + 1,)
        n = accept_greedy(draft, picks)
        return n, int(picks[n])
    if not scorer.sampling:
        # Position by position, stopping at the first pick that differs from the draft: what
        # ``accept_greedy`` keeps, without scoring the positions after a rejection.
        for i in range(draft.numel() + 1):
            pick = int(scorer.scores(torch.cat([prefix, draft[:i]]), logits[i]).argmax())
            if i == draft.numel() or pick != int(draft[i]):
                return i, pick
    prefixes = [torch.cat([prefix, draft[:i]]) for i in range(draft.numel() + 1)]
    p = torch.stack([scorer.probs(pre, row) for pre, row in zip(prefixes, logits, strict=True)])
    q = proposal.probs if proposal.probs is not None else one_hot_rows(draft, vocab, p.dtype)
    return accept_sampled(draft, p, q)


def decode_row(
    target: Target, drafter: Drafter, scorer: Scorer, seq: torch.Tensor, head: torch.Tensor,
    limits: Limits, gamma: Gamma, stats: SpeculativeStats, vocab: int,
) -> torch.Tensor:
    """Generate after ``seq`` (T,) until ``limits`` stop it; returns the new tokens (N,)."""
    start = seq.numel()
    prefill = True
    while True:
        room = limits.max_length - head.numel() - seq.numel()
        # Round 1 is generate's prefill: the prompt in one forward, no draft. Fed in two
        # parts (all but the last token, then the last with drafts), a model whose kernels
        # depend on a forward's token count (int8-activation decode kernels up to
        # `max_rows` rows, float above) would compute the last prompt token otherwise.
        k = 0 if prefill else max(0, min(gamma.next(), room - 1, target.max_rows - 1))
        t0 = time.perf_counter()
        proposal = drafter.propose(seq, k, scorer, head) if k else Proposal(seq.new_empty(0))
        t1 = time.perf_counter()
        logits = target.verify(seq, proposal.tokens)
        n, token = judge(scorer, logits, proposal, torch.cat([head, seq]), vocab)
        t2 = time.perf_counter()
        emitted = torch.cat([proposal.tokens[:n], seq.new_tensor([token])])
        before = seq.numel()
        seq, done = _commit(seq, emitted, head, limits)
        if prefill:
            stats.record_prefill(seq.numel() - before, t2 - t1)
            prefill = False
        else:
            for record in (stats, gamma.running):
                record.record_round(proposal.tokens.numel(), n, seq.numel() - before,
                                    t1 - t0, t2 - t1)
        target.rollback(seq.numel() - 1)
        drafter.rollback(seq.numel() - 1)
        if done:
            return seq[start:]


def _commit(
    seq: torch.Tensor, emitted: torch.Tensor, head: torch.Tensor, limits: Limits
) -> tuple[torch.Tensor, bool]:
    """Append ``emitted`` one token at a time, stopping where ``generate`` would have."""
    full = torch.cat([head, seq, emitted])  # the criteria see growing views of it
    start, end = head.numel(), head.numel() + seq.numel()
    for i in range(1, emitted.numel() + 1):
        if bool(limits.stop(full[: end + i].view(1, -1), None).any()):
            return full[start : end + i], True
    return full[start:], False
