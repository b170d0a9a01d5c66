"""Method families and their ordering rules, declared once.

A recipe is checked against these rules before the model is touched: steps must come in
non-decreasing ``rank`` (prune before quantize, cast after quantize, compile last), and a
family marked ``once`` may appear at most one time. Adding a method never means editing a
list of forbidden pairs: it only names its family.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class FamilyRule:
    """Where a family may stand in a recipe."""

    rank: int  # steps must be in non-decreasing rank
    once: bool  # at most one step of this family per recipe
    why: str  # shown in the error message when the rule is broken


class Family(Enum):
    """The efficiency families; each member's value is its ordering rule."""

    # Physical surgery changes shapes; every later step must see the final shapes.
    STRUCTURE = FamilyRule(0, False, "structural pruning changes layer shapes that later steps use")
    # Masks are chosen on full-precision weights (SparseGPT, Wanda) before they are rounded.
    PRUNE = FamilyRule(1, False, "pruning scores need full-precision weights")
    # Factorization shares pruning's rank: factors may be pruned, and a pruned layer factorized.
    FACTORIZE = FamilyRule(1, False, "factorization needs full-precision weights")
    # Quantizers replace float layers by packed ones; they need float weights to round.
    QUANTIZE = FamilyRule(3, False, "quantizers need float weights, so they come after pruning")
    # Recovery training (distill, lora) follows the structure, prune and quantize steps it
    # recovers from; it shares quantization's rank so that a quantizer may also follow it
    # (structured → distill → int8_dynamic).
    TRAIN = FamilyRule(3, False, "training recovers from earlier steps, before cast/cache/compile")
    # A dtype cast applies to whatever float layers are left.
    CAST = FamilyRule(4, True, "a dtype cast applies to the layers left in float, after quantizers")
    # Weights laid out for the CPU matmul library (``onednn``) once their values and dtypes
    # are final: a cast or quantizer after it would leave the laid-out copy stale.
    LAYOUT = FamilyRule(
        5, True, "weights are laid out for the matmul library once their values and dtypes are "
        "final, after quantizers and casts"
    )
    # The KV cache holds the final model's attention states: set once weights and dtypes are
    # final, before compilation traces the forward that builds the cache.
    CACHE = FamilyRule(
        5, True, "the KV cache is set up on the final weights and dtypes, before compilation"
    )
    # Speculative decoding wraps ``generate`` of the final model: its verify pass runs the
    # quantized/cast weights through the KV cache the cache step set up, so it follows them,
    # and compilation (which traces that forward) follows it.
    SPECULATE = FamilyRule(
        6, True, "speculative decoding wraps generate of the final weights, dtypes and cache, "
        "before compilation"
    )
    # Padding removal runs the final layers (quantized, cast, trained) on packed tokens, and
    # compilation traces that forward.
    RUNTIME = FamilyRule(
        7, True, "padding removal runs the final layers on packed tokens, before compilation"
    )
    # Compilation traces the final module; any later change would be invisible to it.
    COMPILE = FamilyRule(9, True, "compilation must see the final model, so it comes last")

    @property
    def rule(self) -> FamilyRule:
        value: FamilyRule = self.value
        return value

    @property
    def label(self) -> str:
        return self.name.lower()
