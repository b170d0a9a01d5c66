"""``speculative``: ``generate`` drafts ``gamma`` tokens cheaply, then the model verifies them
all in one forward and keeps those it agrees with (Leviathan et al., arXiv 2211.17192).

Three drafters (``mode``):

* ``draft`` — a smaller model with the same vocabulary and tokenizer (``draft``: a built-in
  name, a directory written by ``sl.save``, or a local Hugging Face directory);
* ``self`` — the model itself with about half of its blocks skipped, sharing its KV cache
  (Draft & Verify arXiv 2309.08168, LayerSkip arXiv 2404.16710, SWIFT arXiv 2410.06916); the
  blocks are chosen on calibration data by Block Influence, as ``layer_drop`` chooses them,
  and recorded in ``skip_layers``, so that ``sl.load`` needs no data;
* ``prompt_lookup`` — drafts copied from an earlier occurrence of the last n-gram: no draft
  model at all (the default: it needs nothing and cannot be wrong, only unlucky).

The weights are not touched: the step puts a wrapped ``generate`` on the model (the
:mod:`slimline.speculative.generate` wrapper; ``sl.load`` applies the step again). Greedy
output is the model's own greedy output, token for token; sampled output has its
distribution. "Token for token" up to rounding: a verify forward of several tokens sums
attention in another order than one-token decode (logits ~1e-5 apart, so only exact ties can
differ), and with ``decode_activations: int8`` layers the int8 rounding of the activations
magnifies that to ~1e-2 (llama-1b-random, random weights), so there a near tie can go the
other way; the step notes it. The prompt runs in one forward, as ``generate``'s prefill, and a
verify forward holds no more tokens than the decode kernels take
(:func:`~slimline.quantize.qlinear.decode_rows`). What each call measured is on
``model.speculative_stats`` (all calls) and ``model.speculative_last`` (the latest):
acceptance rate, tokens per round, tokens/s.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, cast

from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.speculative import hf
from slimline.speculative.generate import (
    RUNTIME_ATTR,
    STATS_ATTR,
    Runtime,
    speculative_generate,
)
from slimline.speculative.stats import SpeculativeStats

Mode = Literal["draft", "self", "prompt_lookup"]


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig(MethodConfig):
    """Speculative decoding for a Hugging Face causal LM's ``generate``."""

    method: ClassVar[str] = "speculative"
    family: ClassVar[Family] = Family.SPECULATE
    summary: ClassVar[str] = ("speculative generate: draft model, self-draft with skipped blocks, "
                              "or prompt lookup; greedy output unchanged")
    paper: ClassVar[str] = "Leviathan et al., arXiv 2211.17192; SWIFT, arXiv 2410.06916"
    reapply_on_load: ClassVar[bool] = True

    mode: Mode = "prompt_lookup"
    draft: str | None = None
    # Draft length per round. 5 is transformers' assistant default before its schedule
    # adapts, and near the optimum of arXiv 2211.17192's speed-up for α ≈ 0.7–0.8 at a
    # draft cost c ≈ 0.05–0.1 of the target (their Fig. 3): γ = 4–8 lie within 5% of it.
    gamma: int = 5
    # Choose each round's γ from the measured acceptance rate, draft cost and how a verify
    # forward's time grows with its tokens (gamma.py), between 0 (plain decode, with a
    # one-token probe every 8th such round) and max_gamma; the first round uses gamma.
    adaptive: bool = False
    max_gamma: int = 16
    # prompt_lookup: the longest n-gram matched (then shorter ones, down to 1). transformers
    # matches at most 2; 3 avoids copying after a match on a common token pair.
    ngram: int = 3
    # self: how many blocks the draft skips (null: half of them), or which (chosen from
    # calibration data when empty, then recorded here). Block 0 always runs.
    n_skip: int | None = None
    skip_layers: tuple[int, ...] = ()

    def check(self) -> None:
        if self.targets.include or self.targets.exclude:
            self.fail("targets", "speculative applies to the whole model's generate; remove "
                      "targets")
        if self.gamma < 1:
            self.fail("gamma", f"the draft length must be >= 1, got {self.gamma}")
        if self.max_gamma < self.gamma:
            self.fail("max_gamma", f"must be >= gamma ({self.gamma}), got {self.max_gamma}")
        if self.ngram < 1:
            self.fail("ngram", f"must be >= 1, got {self.ngram}")
        if self.mode == "draft" and not self.draft:
            self.fail("draft", "mode 'draft' needs a draft model: a built-in name, a directory "
                      "written by sl.save, or a local Hugging Face model directory")
        if self.mode != "draft" and self.draft is not None:
            self.fail("draft", f"only mode 'draft' takes a draft model (mode is {self.mode!r})")
        self._check_skip()

    def _check_skip(self) -> None:
        if self.mode != "self":
            for name in ("n_skip", "skip_layers"):
                if getattr(self, name) not in (None, ()):
                    self.fail(name, f"only mode 'self' skips blocks (mode is {self.mode!r})")
            return
        if self.n_skip is not None and self.n_skip < 1:
            self.fail("n_skip", f"must be >= 1, got {self.n_skip}")
        layers = self.skip_layers
        if any(i < 1 for i in layers):
            self.fail("skip_layers", f"block indices must be >= 1 (block 0 always runs: "
                      f"transformers sizes positions and masks from its cache), got {list(layers)}")
        if len(set(layers)) != len(layers):
            self.fail("skip_layers", f"repeated block index in {list(layers)}")
        if layers and self.n_skip is not None and self.n_skip != len(layers):
            self.fail("n_skip", f"{self.n_skip} disagrees with the {len(layers)} skip_layers")

    def requires_calibration(self) -> bool:
        return self.mode == "self" and not self.skip_layers

    def applies_to(self, model: nn.Module) -> bool:
        """Whether ``model`` is a decoder-only Hugging Face LM generating through a KV cache."""
        return hf.why_not(model) is None

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Nothing is replaced. Raises (naming the step) for a model that is not a causal LM,
        blocks that cannot be skipped, or a draft that cannot draft for it."""
        reason = hf.why_not(model)
        if reason is not None:
            raise ValueError(f"{step or self.method}: {reason}")
        if self.mode == "self":
            self.skip_plan(model)
        if self.mode == "draft":
            self.load_draft(model)
        return []

    def skip_plan(self, model: nn.Module) -> tuple[str, int]:
        """The block list's name and how many blocks to skip; ValueError where impossible."""
        from slimline.core.calibration import find_blocks
        from slimline.speculative.layer_skip import default_n_skip

        try:
            prefix, blocks = find_blocks(model)
        except ValueError as exc:
            self.fail("mode", f"'self' skips blocks: {exc}")
        if len(blocks) < 2:
            self.fail("mode", f"'self' needs at least 2 blocks to skip one, {prefix} has "
                      f"{len(blocks)}")
        n = len(self.skip_layers) or self.n_skip or default_n_skip(len(blocks))
        if n >= len(blocks):
            self.fail("n_skip", f"{n} must be < the number of blocks ({len(blocks)}): "
                      "block 0 always runs")
        if any(i >= len(blocks) for i in self.skip_layers):
            self.fail("skip_layers", f"{list(self.skip_layers)}: {prefix} has {len(blocks)} "
                      "blocks")
        return prefix, n

    def load_draft(self, model: nn.Module) -> nn.Module:
        """The draft model, checked against ``model``; ValueError naming the difference."""
        from slimline.speculative.draft import load_draft, mismatch, target_tokenizer

        draft, draft_tok = load_draft(cast(str, self.draft))
        reason = mismatch(model, draft, target_tokenizer(model), draft_tok)
        if reason is not None:
            self.fail("draft", f"{self.draft!r} cannot draft for {type(model).__name__}: "
                      f"{reason}")
        return draft


@register(SpeculativeConfig)
def apply_speculative(model: nn.Module, cfg: SpeculativeConfig, ctx: StepContext) -> StepOutcome:
    """Give ``model`` a speculative ``generate`` (idempotent: ``sl.load`` runs it again)."""
    runtime = Runtime(cfg.mode, cfg.gamma, cfg.adaptive, cfg.max_gamma, cfg.ngram,
                      inner=_previous_generate(model))
    recorded, notes = cfg, [f"mode {cfg.mode}, gamma {cfg.gamma}"
                            + (f" (adaptive, up to {cfg.max_gamma})" if cfg.adaptive else "")]
    if cfg.mode == "draft":
        from slimline.speculative.draft import resolve_reference

        runtime.draft = cfg.load_draft(model)
        recorded = replace(cfg, draft=resolve_reference(cast(str, cfg.draft)))
        notes.append(f"draft model {recorded.draft} ({_params(runtime.draft)} parameters, "
                     f"target {_params(model)})")
    if cfg.mode == "self":
        skip, note = _choose_skip(model, cfg, ctx)
        recorded = replace(cfg, skip_layers=tuple(skip))
        from slimline.core.calibration import find_blocks
        from slimline.speculative.layer_skip import output_form

        runtime.blocks, blocks = find_blocks(model)
        runtime.skip, runtime.tuple_len = tuple(skip), output_form(model, blocks)
        notes.append(note)
    if any(getattr(m, "decode_activations", "float") == "int8" for m in model.modules()):
        notes.append("int8 decode activations: greedy output may differ from plain generate "
                     "where two tokens nearly tie (int8 rounding magnifies the float rounding "
                     "a several-token verify forward changes)")
    setattr(model, RUNTIME_ATTR, runtime)
    if not isinstance(getattr(model, STATS_ATTR, None), SpeculativeStats):
        setattr(model, STATS_ATTR, SpeculativeStats())
    # An instance attribute shadows the class's method; deepcopy rebinds it to the copy.
    cast(Any, model).generate = types.MethodType(speculative_generate, model)
    return StepOutcome(modules=[""], notes=notes, recorded=recorded)


def _previous_generate(model: nn.Module) -> Any:
    """The ``generate`` in effect before this step, unbound (None: the class's own); on a
    model that already has this step, the one that was in effect before it."""
    current = vars(model).get("generate")
    if current is None:
        return None
    func = getattr(current, "__func__", None)
    if func is speculative_generate:
        return getattr(model, RUNTIME_ATTR).inner
    if func is None:
        raise ValueError(f"speculative: {type(model).__name__}.generate was replaced by a "
                         f"{type(current).__name__}, not a method; it cannot be wrapped")
    return func


def _choose_skip(
    model: nn.Module, cfg: SpeculativeConfig, ctx: StepContext
) -> tuple[list[int], str]:
    if cfg.skip_layers:
        return sorted(cfg.skip_layers), f"draft skips blocks {sorted(cfg.skip_layers)} (given)"
    if not ctx.calibration:
        cfg.fail("mode", "'self' chooses the blocks to skip on calibration data: pass "
                 "calibration=batches (or give skip_layers)")
    from slimline.speculative.layer_skip import choose_skipped

    _, n = cfg.skip_plan(model)
    skip, scores = choose_skipped(model, ctx.calibration, n)
    shown = ", ".join(f"{i}={v:.4f}" for i, v in enumerate(scores.tolist()))
    return skip, f"draft skips blocks {skip} of {scores.numel()} (block influence: {shown})"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
