"""Layer fallback by measured sensitivity: the fewest layers that take a safer form to meet
a quality target (Wu et al., *Integer Quantization for Deep Learning Inference*, arXiv
2004.09602, §6 "partial quantization": rank layers by the accuracy lost when quantizing each
alone, keep the worst ones in the safer form until the model is good enough).

Used by ``smoothquant`` with ``activations: static`` and ``min_cosine``: each layer has a
static-activation form (fast: no run-time reduction) and a per-token dynamic one (robust);
the layers whose static grids hurt the model's output most go dynamic. Quality is measured
on the model's real output — the mean cosine of :func:`~slimline.core.batches.output_tensor`
(an encoder's mean-pooled embedding, a language model's logits over its real tokens) to the
unquantized model's — not on each layer's own output error, which does not say how much an
error grows downstream (on ``minilm`` the layers' own static/dynamic error ratios, 1.3-3.6,
did not single out the feed-forward down projections that matter most).

Cost: one forward pass over the check batches per layer (each layer's gain alone), then a
bisection over how many of the ranked layers switch (``log2`` of the layer count passes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from slimline.core.batches import Batch, batch_size, forward, output_tensor, token_mask
from slimline.evaluate.metrics import cosine_sum

# Check batches are held out of the calibration data until they hold this many positions:
# enough for a stable mean, and a bound on the reference outputs kept (a language model's
# logits are positions × vocabulary floats).
CHECK_POSITIONS = 4096


def split_off_checks(
    calibration: Sequence[Batch], positions: int = CHECK_POSITIONS
) -> tuple[list[Batch], list[Batch]]:
    """(fit, check): the last calibration batches — up to ``positions`` token positions, at
    most a quarter of the batches, at least one — held out to check the quantized model on,
    and the rest to fit its ranges on, so that the check sees text the ranges were not fitted
    to. One batch is both. (It is no guarantee for other text: on ``minilm``, all-static
    layers checked on held-out train batches gave cosine 0.99825 and on the test split
    0.99759 — the test sentences are harder — so a recipe's target keeps a margin.)"""
    batches = list(calibration)
    if len(batches) < 2:
        return batches, batches
    check: list[Batch] = []
    seen = 0
    while len(check) < max(1, len(batches) // 4) and seen < positions:
        batch = batches[len(batches) - 1 - len(check)]
        check.insert(0, batch)
        mask = token_mask(batch)
        seen += int(mask.sum()) if mask is not None else batch_size(batch)
    return batches[: len(batches) - len(check)], check


def model_outputs(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """``model``'s answer (:func:`output_tensor`) on each batch, in float32."""
    with torch.no_grad():
        return [output_tensor(forward(model, b), b).float() for b in batches]


def output_cosine(
    model: nn.Module, batches: Sequence[Batch], reference: Sequence[torch.Tensor]
) -> float:
    """Mean cosine of ``model``'s answers to ``reference`` over the items of ``batches``
    (per-token answers flattened per item over its real tokens: :func:`cosine_sum`)."""
    total, count = 0.0, 0
    for batch, ref, out in zip(batches, reference, model_outputs(model, batches), strict=True):
        mask = token_mask(batch) if out.dim() == 3 else None
        s, n = cosine_sum(ref, out, mask)
        total, count = total + s, count + n
    return total / max(count, 1)


def rank_by_gain(gains: Mapping[str, float]) -> list[str]:
    """Layer names, the one whose switch alone gives the best quality first (ties: in the
    model's order)."""
    order = list(gains)
    return sorted(order, key=lambda n: (-gains[n], order.index(n)))


def fall_back(
    model: nn.Module,
    safer: Mapping[str, nn.Module],
    quality: Callable[[], float],
    target: float,
) -> tuple[list[str], float]:
    """Put the fewest layers of ``safer`` (name → its safer replacement) into ``model`` for
    ``quality()`` to reach ``target``, most sensitive first.

    Each layer's gain is measured alone; then the count ``k`` of top-ranked layers is
    bisected, keeping the smallest ``k`` whose measured quality reached the target (quality
    is close to monotone in ``k``; whatever is kept was measured, so a non-monotone step can
    cost a few extra layers, never the target). Returns the switched names (in rank order)
    and the quality of the model left; when even all of them miss the target, all are
    switched and the quality returned is below it.
    """
    current = {name: model.get_submodule(name) for name in safer}

    def place(names: Sequence[str]) -> None:
        chosen = set(names)
        for name in safer:
            model.set_submodule(name, safer[name] if name in chosen else current[name])

    def switch(names: Sequence[str]) -> float:
        place(names)
        return quality()

    base = quality()
    if base >= target or not safer:
        return [], base
    ranked = rank_by_gain({name: switch([name]) for name in safer})
    lo, best = 0, switch(ranked)  # k = 0 misses; k = all is the most there is
    hi = len(ranked)
    if best < target:
        return ranked, best
    while hi - lo > 1:
        mid = (lo + hi) // 2
        q = switch(ranked[:mid])
        if q >= target:
            hi, best = mid, q
        else:
            lo = mid
    place(ranked[:hi])
    return ranked[:hi], best
