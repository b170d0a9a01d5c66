"""Mixed precision: a bit width per layer, from measured sensitivity, under a size budget.

HAWQ (Dong et al., arXiv 1905.03696) ranks layers by the curvature of the loss and gives the
sensitive ones more bits; HAWQ-V3 (Yao et al., arXiv 2011.10680) states the choice as an
integer program — minimise the summed sensitivity subject to a model-size budget — and solves
it exactly. slimline does the same for the weight-only quantizers ``rtn``, ``gptq``, ``hqq``:
each layer's sensitivity ``e_l(b)`` and stored size ``s_l(b)`` at each width b are measured
by :mod:`slimline.quantize.mixed_sensitivity`, then

* **allocation**: ``min Σ e_l(b_l)  s.t.  Σ s_l(b_l) ≤ average_bits · Σ N_l K_l``, a
  multiple-choice knapsack, solved by :func:`allocate_bits` (dynamic programming over sizes
  rounded up to a grid, then a greedy fill of the slack the rounding left). A budget of
  ``average_bits`` is *stored* bits per weight (codes, scales, zero points; not the bias),
  comparable with uniform 4-bit g128 at 4 + 16/128 = 4.125.

:func:`plan_bits` does both and returns a :class:`BitPlan`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.core.targets import linear_weight
from slimline.quantize.mixed_sensitivity import Quantizer, measure_candidates

# The dynamic programme's table: at most this many states per layer (float64 vectors of
# 32 MiB) and this many (layer, state) choices in all (int8, 64 MiB). A 7B Llama's 224 layers
# get 300k states: rounding then costs at most 0.07% of the budget (see allocate_bits).
_MAX_UNITS = 1 << 22
_MAX_CELLS = 1 << 26


def allocate_bits(
    errors: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, Mapping[int, int]],
    budget_bits: int,
    *,
    max_units: int = _MAX_UNITS,
    max_cells: int = _MAX_CELLS,
) -> dict[str, int]:
    """The width per layer minimising ``Σ errors[l][b]`` with ``Σ sizes[l][b] ≤ budget_bits``.

    ``errors[l][b]`` is layer l's sensitivity at b bits, ``sizes[l][b]`` its stored bits
    (positive integers); each layer offers the same widths in both maps.

    A dynamic programme over the budget spent, in units of ``u`` bits. When every size is a
    multiple of a ``u`` that leaves at most ``min(max_units, max_cells / L)`` units in the
    budget — usual for real layers, whose sizes share large powers of two — the answer is
    the exact optimum. Otherwise sizes are rounded *up* to the smallest ``u`` that does: the
    answer still fits the budget, and its error is at most that of the best allocation under
    ``budget_bits − L·u`` (every such allocation fits the rounded problem), which is within
    ``L² / max_cells`` of the budget (0.07% for 224 layers); the slack rounding leaves is
    then filled greedily with exact sizes. Raises ValueError when even the cheapest width of
    every layer exceeds the budget.
    """
    names = _check_problem(errors, sizes)
    cheapest = sum(min(sizes[n].values()) for n in names)
    if cheapest > budget_bits:
        raise ValueError(f"budget of {budget_bits} bits is below the cheapest layout, {cheapest}")
    states = max(1, min(max_units, max_cells // len(names)))
    common = math.gcd(*(size for n in names for size in sizes[n].values()))
    unit = common if budget_bits // common <= states else math.ceil(budget_bits / states)
    widths = _knapsack(names, errors, sizes, budget_bits // unit, unit)
    if widths is None:  # rounding up made every allocation too dear: start from the cheapest
        widths = {n: min(sizes[n], key=sizes[n].__getitem__) for n in names}
    return _fill_greedily(widths, errors, sizes, budget_bits)


def _check_problem(
    errors: Mapping[str, Mapping[int, float]], sizes: Mapping[str, Mapping[int, int]]
) -> list[str]:
    if set(errors) != set(sizes) or not errors:
        raise ValueError("errors and sizes must describe the same, non-empty set of layers")
    for name in errors:
        if not errors[name] or set(errors[name]) != set(sizes[name]):
            raise ValueError(f"layer {name!r}: errors and sizes must offer the same widths")
        if not all(math.isfinite(e) and e >= 0 for e in errors[name].values()):
            raise ValueError(f"layer {name!r}: errors must be finite and ≥ 0")
        if not all(isinstance(s, int) and s > 0 for s in sizes[name].values()):
            raise ValueError(f"layer {name!r}: sizes must be positive integers (bits)")
    return list(errors)


def _knapsack(
    names: list[str],
    errors: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, Mapping[int, int]],
    units: int,
    unit: int,
) -> dict[str, int] | None:
    """Multiple-choice knapsack by DP over units used (sizes rounded up); None if none fits."""
    best = torch.full((units + 1,), math.inf, dtype=torch.float64)  # least error per units used
    best[0] = 0.0
    picks = torch.zeros(len(names), units + 1, dtype=torch.int8)  # the choice behind each state
    options = {n: sorted(errors[n]) for n in names}
    for i, name in enumerate(names):
        after = torch.full_like(best, math.inf)
        for j, b in enumerate(options[name]):
            cost = math.ceil(sizes[name][b] / unit)
            if cost > units:
                continue
            tried = best[: units + 1 - cost] + errors[name][b]  # states cost..units
            better = tried < after[cost:]
            after[cost:] = torch.where(better, tried, after[cost:])
            picks[i, cost:][better] = j
        best = after
    if not math.isfinite(float(best.min())):
        return None
    used = int(torch.argmin(best))
    widths = {}
    for i in reversed(range(len(names))):
        name = names[i]
        b = options[name][int(picks[i, used])]
        widths[name] = b
        used -= math.ceil(sizes[name][b] / unit)
    return widths


def _fill_greedily(
    widths: dict[str, int],
    errors: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, Mapping[int, int]],
    budget_bits: int,
) -> dict[str, int]:
    """Spend what is left of the budget: take the change that cuts error most, while one fits."""
    widths = dict(widths)
    left = budget_bits - sum(sizes[n][b] for n, b in widths.items())
    while True:
        gain, move = 0.0, None
        for name, current in widths.items():
            for b, err in errors[name].items():
                extra = sizes[name][b] - sizes[name][current]
                if extra <= left and errors[name][current] - err > gain:
                    gain, move = errors[name][current] - err, (name, b, extra)
        if move is None:
            return widths
        name, b, extra = move
        widths[name] = b
        left -= extra


@dataclass(frozen=True)
class BitPlan:
    """The chosen width per layer and what it costs, in stored bits."""

    widths: dict[str, int]
    stored: int  # bits of codes, scales and zero points, as planned
    weights: int  # Σ N·K over the layers
    average_bits: float  # the budget, stored bits per weight
    weighted: bool

    def describe(self, realised_bits: int | None = None) -> str:
        """E.g. ``mixed precision 3b×5, 4b×12, 8b×2: 4.23 stored bits/weight (budget 4.25)``."""
        counts = Counter(self.widths.values())
        mix = ", ".join(f"{b}b×{counts[b]}" for b in sorted(counts))
        spent = self.stored if realised_bits is None else realised_bits
        how = "K-FAC output cost (calibration data)" if self.weighted else "‖ΔW‖² (no data)"
        return (
            f"mixed precision {mix}: {spent / self.weights:.3f} stored bits/weight "
            f"(budget {self.average_bits:g}); sensitivity: {how}"
        )


def plan_bits(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantize: Quantizer,
    *,
    average_bits: float,
    bit_choices: Sequence[int],
    group_size: int | None,
    calibration: Sequence[Batch] | None,
    step: str,
    progress: bool = False,
) -> BitPlan:
    """Measure every layer at every width and choose widths within ``average_bits``.

    ``step`` names the recipe step in the ValueError raised when the budget is below what
    the layers can take (their cheapest widths with their real scales), before any change.
    """
    found = measure_candidates(
        model, layers, quantize, bit_choices, group_size, calibration, progress=progress
    )
    weights = sum(linear_weight(m).numel() for m in layers.values())
    budget = math.floor(average_bits * weights)
    cheapest = sum(min(s.values()) for s in found.sizes.values())
    if cheapest > budget:
        raise ValueError(
            f"{step}.average_bits: {average_bits:g} is below the {cheapest / weights:.4f} stored "
            f"bits per weight of these layers at {min(bit_choices)} bits"
        )
    widths = allocate_bits(found.errors, found.sizes, budget)
    stored = sum(found.sizes[n][b] for n, b in widths.items())
    return BitPlan(widths, stored, weights, average_bits, found.weighted)


def layer_stored_bits(layer: nn.Module) -> int:
    """Bits a packed layer stores for its weight: ``qweight``, ``scales`` and ``zeros``."""
    total = 0
    for name in ("qweight", "scales", "zeros"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    return 8 * total
