"""Self-speculation: the model drafts for itself with some of its blocks skipped.

Draft & Verify (Zhang et al., arXiv 2309.08168), LayerSkip (Elhoushi et al., arXiv
2404.16710) and SWIFT (Xia et al., arXiv 2410.06916) draft with a shallower copy of the
target that shares its weights and its KV cache: no second model is held in memory. Which
blocks to skip is chosen here from calibration data by Block Influence,
``BI = 1 − cos(block input, block output)`` (ShortGPT, arXiv 2403.03853): a block that barely
turns the residual stream changes the draft least when skipped. The score is the one
``layer_drop`` uses (:func:`slimline.prune.layer_drop.measure_block_influence`).

Block 0 always runs: transformers reads the past length (positions) and sizes the attention
mask from the first layer's cache, so that layer's cache must hold every token the kept
layers hold. The skipped layers' caches simply fall behind during drafting; the verify pass
that follows runs every layer on the drafted positions, after the draft's entries have been
cropped from the kept layers (they were computed from hidden states the skipped blocks never
touched, so the full model cannot reuse them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimline.core.batches import Batch


def choose_skipped(
    model: nn.Module, batches: Sequence[Batch], n_skip: int
) -> tuple[list[int], torch.Tensor]:
    """The ``n_skip`` blocks (never block 0) with the lowest Block Influence on ``batches``,
    ascending, and every block's score (L,)."""
    from slimline.prune.layer_drop import choose_blocks, measure_block_influence

    scores = measure_block_influence(model, batches)
    return choose_blocks(scores, list(range(1, scores.numel())), n_skip), scores


def default_n_skip(n_blocks: int) -> int:
    """Half of the blocks, rounded down (at least one; block 0 always runs).

    SWIFT skips about half of a model's layers (its skip ratio 0.45–0.5 on LLaMA-2 and
    CodeLlama, arXiv 2410.06916 Table 2); fewer skipped blocks draft better but cost more.
    """
    return max(1, min(n_blocks // 2, n_blocks - 1))


class PassThrough(nn.Module):
    """Stands in for a skipped block: returns its hidden states unchanged, in the form the
    block itself returns them (a tensor, or a tuple led by it; ``tuple_len`` 0: a tensor)."""

    def __init__(self, tuple_len: int) -> None:
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.tuple_len == 0:
            return hidden_states
        return (hidden_states, *([None] * (self.tuple_len - 1)))


@contextmanager
def skipping(blocks: nn.ModuleList, skip: Sequence[int], tuple_len: int) -> Iterator[None]:
    """While active, blocks ``skip`` of ``blocks`` pass their input through (restored after,
    also on error)."""
    kept = {i: blocks[i] for i in skip}
    try:
        for i in skip:
            blocks[i] = PassThrough(tuple_len)
        yield
    finally:
        for i, block in kept.items():
            blocks[i] = block


@torch.no_grad()
def output_form(model: nn.Module, blocks: nn.ModuleList) -> int:
    """How ``blocks`` return hidden states, probed on one token: 0 for a tensor (transformers
    5.x Llama and GPT-2), else the length of the tuple they return."""
    seen: list[int] = []

    def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        seen.append(len(out) if isinstance(out, tuple) else 0)

    handle = blocks[0].register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"speculative: block 0 of {type(model).__name__} did not run in a "
                         "forward, so its blocks cannot be skipped")
    return seen[0]
