"""Ranks across layers under one parameter budget, by measured sensitivity.

Layers are not equally compressible: ASVD (arXiv 2312.05821 §3.3) searches per-layer ranks by
their effect on perplexity, and SVD-LLM's follow-ups allocate ranks by layer importance. Here
the question is the one the mixed-precision allocator answers (:mod:`slimline.quantize.mixed`,
HAWQ-V3's integer program) with ranks in place of bit widths:

    min Σ_l e_l(r_l)   s.t.   Σ_l r_l (N_l + K_l) ≤ budget

where e_l(r) is the output cost of truncating layer l alone to rank r — the K-FAC cost
Σ_n G_nn (ΔW A ΔWᵀ)_nn (A = X Xᵀ / n from the layer's inputs, G from gradients at its outputs,
``quantize/mixed_sensitivity.output_gains``) with calibration data, ‖ΔW‖²_F without — and a
layer may also stay dense (cost 0, N·K weights). The budget is what the uniform choice
(``rank``, ``ratio`` or ``energy``) would spend, so both compare at the same size. The
multiple-choice knapsack is ``quantize.mixed.allocate_bits``, reused as it is, here and for
``tucker``'s layouts (:mod:`slimline.factorize.tucker_allocate`): :func:`plan_within_budget`
takes any layer's candidate layouts.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

from slimline.core.calibration import sequential_layers
from slimline.core.registry import StepContext
from slimline.core.targets import linear_weight
from slimline.factorize.base import Decompose, FactorStats, LowRankConfig
from slimline.factorize.decomposition import truncation_errors
from slimline.factorize.ranks import candidate_ranks, factor_params, max_saving_rank
from slimline.quantize.mixed import allocate_bits
from slimline.quantize.mixed_sensitivity import output_gains

Choice = TypeVar("Choice", bound=Hashable)


@dataclass(frozen=True)
class RankPlan(Generic[Choice]):
    """The chosen layout per layer and the parameters it spends. A layout is a rank
    (``min(N, K)``: kept dense) for the matrix methods, Tucker's (r_out, r_in) (None: dense)."""

    ranks: dict[str, Choice]
    spent: int  # weights of the chosen layout
    budget: int  # weights the uniform choice would spend
    weighted: bool  # errors measured on calibration data (K-FAC), else ‖ΔW‖²

    def __str__(self) -> str:
        how = "K-FAC output cost (calibration data)" if self.weighted else "‖ΔW‖² (no data)"
        return (f"allocated ranks: {self.spent} weights of a budget of {self.budget}; "
                f"sensitivity: {how}")


@dataclass(frozen=True)
class LayerOptions(Generic[Choice]):
    """One layer's candidate layouts: each one's error and weights, and the weights the
    uniform choice spends (itself among the candidates, or the dense layer)."""

    errors: dict[Choice, float]
    sizes: dict[Choice, int]
    uniform: int


def plan_within_budget(options: dict[str, LayerOptions[Choice]], *, weighted: bool
                       ) -> RankPlan[Choice]:
    """The layouts of least total error spending at most what the uniform choice spends.

    Not ⌊ratio · Σ N·K⌋: each uniform rank is rounded down, and that budget would let the
    allocated layout spend more weights than the uniform one it is compared with.
    """
    budget = sum(o.uniform for o in options.values())
    keys = {n: list(o.errors) for n, o in options.items()}  # the knapsack's widths: indices
    errors = {n: {i: o.errors[c] for i, c in enumerate(keys[n])} for n, o in options.items()}
    sizes = {n: {i: o.sizes[c] for i, c in enumerate(keys[n])} for n, o in options.items()}
    picked = allocate_bits(errors, sizes, budget)
    ranks = {n: keys[n][i] for n, i in picked.items()}
    spent = sum(options[n].sizes[c] for n, c in ranks.items())
    return RankPlan({n: ranks[n] for n in options}, spent, budget, weighted)


def layer_options(n: int, k: int, errors: torch.Tensor, uniform: int) -> LayerOptions[int]:
    """One (n, k) layer's candidate ranks, their errors and weights.

    ``errors`` (m + 1,) are the truncation errors at every rank; the dense layer is offered
    as rank ``min(n, k)`` at no error, and the uniform rank is always among the candidates.
    """
    dense = min(n, k)
    saving = uniform <= max_saving_rank(n, k)
    ranks = candidate_ranks(n, k, extra=(uniform,) if saving else ())
    errs = {r: float(errors[r]) for r in ranks} | {dense: 0.0}
    sizes = {r: factor_params(n, k, r) for r in ranks} | {dense: n * k}
    return LayerOptions(errs, sizes, sizes[uniform] if saving else n * k)


def allocate_ranks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    cfg: LowRankConfig,
    decompose: Decompose,
    ctx: StepContext,
) -> RankPlan[int]:
    """Measure every layer on the unchanged model, then choose ranks within the budget."""
    data = ctx.calibration
    gains = output_gains(model, layers, data) if data else None
    options: dict[str, LayerOptions[int]] = {}

    def measure(name: str, module: nn.Module, stats: FactorStats | None) -> None:
        w = linear_weight(module).detach().double()  # (N, K)
        n, k = w.shape
        dec = decompose(w, stats)
        hessian = None if stats is None else stats.xxt / stats.tokens  # A = X Xᵀ / n
        errors = truncation_errors(dec, hessian, None if gains is None else gains[name])
        options[name] = layer_options(n, k, errors, cfg.uniform_rank(n, k, dec.values))

    if data:
        def record(group: dict[str, nn.Module], stats: dict[str, FactorStats]) -> None:
            for name, module in group.items():
                measure(name, module, stats[name])

        sequential_layers(model, layers, data, lambda _n, m: cfg.stats_for(m, allocating=True),
                          record, progress=ctx.progress, desc=f"{cfg.method} sensitivity")
    else:
        for name, module in layers.items():
            measure(name, module, None)
    return plan_within_budget({n: options[n] for n in layers}, weighted=bool(data))
