"""What speculative ``generate`` measured: drafts proposed and kept, tokens, time.

A model with a ``speculative`` step carries two of these: ``speculative_stats`` (every call
since the step was applied, or since :meth:`SpeculativeStats.reset`) and
``speculative_last`` (the latest call alone). ``slimline eval`` reads them to report the
acceptance rate and decode tokens/s beside its other figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class SpeculativeStats:
    """Counts and seconds of speculative rounds; the rates are properties."""

    calls: int = 0
    rounds: int = 0
    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # of those, kept by the target
    rejected: int = 0  # rounds that stopped at a rejected draft
    new_tokens: int = 0  # tokens emitted (accepted drafts + one target token per round)
    seconds: float = 0.0  # wall time of the decoding loops
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefills: int = 0  # prompt forwards (one a sequence), each emitting the first token
    prefill_seconds: float = 0.0
    drafted_sq: int = 0  # Σ over rounds of (tokens drafted)², and of drafted × verify
    drafted_verify_seconds: float = 0.0  # seconds: the sums that fit verify_cost
    fallbacks: int = 0  # calls run by plain generate (options speculation does not cover)
    last_fallback: str = ""  # why the latest fallback happened

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the target kept (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verify forward (after each prompt's prefill): the speed-up
        bound if drafting were free."""
        return (self.new_tokens - self.prefills) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (prefill included)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def alpha(self) -> float:
        """Per-draft acceptance probability (arXiv 2211.17192's α): accepted / tested drafts,
        where a round's drafts after its first rejection were never tested; one
        pseudo-count each way keeps early estimates off 0 and 1."""
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    @property
    def draft_cost(self) -> float:
        """Seconds of one draft step over seconds of one verify forward (the paper's c)."""
        if not self.drafted or not self.rounds or self.verify_seconds <= 0:
            return 0.0
        return (self.draft_seconds / self.drafted) / (self.verify_seconds / self.rounds)

    @property
    def verify_cost(self) -> tuple[float, float]:
        """``(v0, u)``: seconds of a verify forward without drafts, and what each drafted
        token adds to it — the least-squares line through the rounds' (drafted, verify
        seconds); ``u = 0`` (the mean for ``v0``) until rounds of different draft lengths were
        measured. A forward of several tokens costs more than one where decode is not purely
        memory-bound (llama-1b-random, int4 with int8 activations, 2 threads: 33 ms for 1
        token, 55 for 2, 97 for 5)."""
        n, k, v = self.rounds, self.drafted, self.verify_seconds
        if n == 0:
            return 0.0, 0.0
        spread = n * self.drafted_sq - k * k
        if spread <= 0:
            return v / n, 0.0
        u = (n * self.drafted_verify_seconds - k * v) / spread
        v0 = (v - u * k) / n
        if u <= 0.0 or v0 <= 0.0:  # noise: no growth measured
            return v / n, 0.0
        return v0, u

    def record_prefill(self, emitted: int, seconds: float) -> None:
        """The prompt's forward (generate's prefill): the tokens it emitted (1, or 0 where a
        stopping criterion ended the row at once) and its seconds; not a round."""
        self.prefills += 1
        self.new_tokens += emitted
        self.prefill_seconds += seconds

    def record_round(
        self, drafted: int, accepted: int, emitted: int, draft_s: float, verify_s: float
    ) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejected += int(accepted < drafted)
        self.new_tokens += emitted
        self.draft_seconds += draft_s
        self.verify_seconds += verify_s
        self.drafted_sq += drafted * drafted
        self.drafted_verify_seconds += drafted * verify_s

    def add(self, other: SpeculativeStats) -> None:
        """Add ``other``'s counts and seconds (a finished call) to these."""
        for f in fields(self):
            if f.name == "last_fallback":
                self.last_fallback = other.last_fallback or self.last_fallback
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())

    def to_dict(self) -> dict[str, Any]:
        """Counts, seconds and rates as plain JSON values."""
        out = asdict(self)
        out.update(acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                   tokens_per_s=self.tokens_per_s, alpha=self.alpha, draft_cost=self.draft_cost)
        return out
