"""What ``svd``, ``asvd`` and ``svd_llm`` share: their fields, and the loop that factorizes.

Each selected Linear-like layer (``nn.Linear``, GPT-2's ``Conv1D``) W (N, K) becomes a
:class:`~slimline.factorize.layers.LowRankLinear` of rank r. The methods that read activations
walk the model block by block (``core.calibration.sequential_layers``), as GPTQ does: a
block's layers are factorized from inputs that went through the already factorized blocks.
With ``allocation: sensitivity`` the ranks are first chosen across layers by
:mod:`slimline.factorize.allocate` under the same parameter budget as the uniform choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slimline.core.calibration import sequential_layers
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome
from slimline.core.targets import linear_weight
from slimline.factorize.decomposition import Decomposition
from slimline.factorize.layers import LowRankLinear
from slimline.factorize.ranks import (
    break_even_rank,
    factor_params,
    max_saving_rank,
    rank_for_energy,
    rank_for_ratio,
)
from slimline.factorize.swaps import Swaps, undone_on_failure

Allocation = Literal["uniform", "sensitivity"]
# Half the parameters when nothing is said: where plain SVD of an LLM starts to hurt
# (SVD-LLM, arXiv 2403.07378, Table 1 compares methods from 20% to 60% removed).
DEFAULT_RATIO = 0.5


class FactorStats:
    """A layer's input statistics for factorization: X Xᵀ and Σ|x| per feature, float64.

    An accumulator for ``core.calibration``'s capture (``add_batch``), fed real tokens only.
    X Xᵀ is summed in float64 (the shared ``InputStats`` sums in float32): SVD-LLM's
    Cholesky factor and its truncation theorem (arXiv 2403.07378, Thm. 3.2) are only as exact
    as X Xᵀ, and a float32 sum over many tokens loses the small eigenvalues first — the
    directions whose truncation error the whitening is meant to weigh.
    """

    def __init__(self, in_features: int, *, hessian: bool, abs_mean: bool) -> None:
        self.tokens = 0
        self._xxt = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64) if abs_mean else None

    def add_batch(self, x: torch.Tensor) -> None:
        """``x`` (..., K): every leading position is one token."""
        flat = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, K)
        self.tokens += flat.shape[0]
        if self._xxt is not None:
            self._xxt = self._xxt.to(flat.device)
            self._xxt += flat.t() @ flat
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum.to(flat.device) + flat.abs().sum(0)

    @property
    def xxt(self) -> torch.Tensor:
        """Σ x xᵀ over tokens (K, K), float64."""
        if self._xxt is None:
            raise ValueError("FactorStats was built without X Xᵀ")
        return self._xxt

    @property
    def abs_mean(self) -> torch.Tensor:
        """mean |x_j| per input feature (K,), float64."""
        if self.abs_sum is None:
            raise ValueError("FactorStats was built without Σ|x|")
        return self.abs_sum / max(self.tokens, 1)


# ``(W (N, K) float64, stats or None) -> W = U diag(s) R``: the method's transform and SVD.
Decompose = Callable[[torch.Tensor, FactorStats | None], Decomposition]


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(MethodConfig):
    """Fields shared by the matrix factorizations: how much to keep, and how to spread it.

    Exactly one of ``rank``, ``ratio``, ``energy`` says how much; none means ``ratio: 0.5``.
    """

    family: ClassVar[Family] = Family.FACTORIZE
    # Which statistics the method's transform reads (besides what allocation needs).
    uses_hessian: ClassVar[bool] = False
    uses_abs_mean: ClassVar[bool] = False

    # The same rank r for every layer; refused where r ≥ N·K/(N+K) (it would not save).
    rank: int | None = None
    # Fraction of each layer's weights kept: r = ⌊ratio · N·K / (N+K)⌋.
    ratio: float | None = None
    # Fraction of the (transformed) squared singular values kept, per layer; a layer whose
    # rank would not save parameters stays dense.
    energy: float | None = None
    # ``sensitivity``: ranks differ by layer, chosen by measured output error under the
    # parameter budget the uniform choice would spend (arXiv 2312.05821 §3.3 does the same
    # search by perplexity; here the mixed-precision knapsack).
    allocation: Allocation = "uniform"

    def check(self) -> None:
        given = [n for n in ("rank", "ratio", "energy") if getattr(self, n) is not None]
        if len(given) > 1:
            self.fail(given[1], f"give one of rank, ratio, energy, not {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            self.fail("rank", f"must be ≥ 1, got {self.rank}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            self.fail("ratio", f"{self.ratio} is outside (0, 1)")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            self.fail("energy", f"{self.energy} is outside (0, 1]")

    @property
    def kept_ratio(self) -> float | None:
        """The ratio in force: ``ratio``, the default when nothing is given, else None."""
        if self.rank is None and self.energy is None:
            return DEFAULT_RATIO if self.ratio is None else self.ratio
        return None

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """The default selection, refused where a rank or ratio cannot save parameters."""
        chosen = super().select_modules(model, step=step)
        for name, module in chosen:
            n, k = linear_weight(module).shape
            if self.rank is not None and self.rank > max_saving_rank(n, k):
                self.fail("rank", f"{self.rank} does not save parameters in {name} ({n}×{k}): "
                          f"the break-even rank is {break_even_rank(n, k):.2f} "
                          f"(r·(N+K) ≥ N·K); use rank ≤ {max_saving_rank(n, k)}")
            ratio = self.kept_ratio
            if ratio is not None and rank_for_ratio(n, k, ratio) < 1:
                self.fail("ratio", f"{ratio} keeps less than rank 1 of {name} ({n}×{k}); "
                          f"rank 1 keeps {factor_params(n, k, 1) / (n * k):.4f}")
        return chosen

    def uniform_rank(self, n: int, k: int, values: torch.Tensor) -> int:
        """The rank this config gives an (n, k) layer with (transformed) singular ``values``."""
        if self.rank is not None:
            return self.rank
        if self.energy is not None:
            return rank_for_energy(values, self.energy)
        ratio = self.kept_ratio
        return rank_for_ratio(n, k, DEFAULT_RATIO if ratio is None else ratio)

    def stats_for(self, module: nn.Module, *, allocating: bool = False) -> FactorStats:
        k = linear_weight(module).shape[1]
        return FactorStats(k, hessian=self.uses_hessian or allocating,
                           abs_mean=self.uses_abs_mean)


def replace_layer(
    swaps: Swaps, name: str, module: nn.Module, dec: Decomposition, rank: int
) -> LowRankLinear:
    """Install the rank-``rank`` factors of ``dec`` in place of ``module`` (Linear or Conv1D)."""
    weight = linear_weight(module)
    first, second = dec.factors(rank)
    bias = getattr(module, "bias", None)
    layer = LowRankLinear.from_factors(
        first.to(weight), second.to(weight), None if bias is None else bias.detach(), weight.dtype
    )
    swaps.replace(name, layer)
    return layer


def factorize_layers(
    model: nn.Module, cfg: LowRankConfig, ctx: StepContext, decompose: Decompose
) -> StepOutcome:
    """Factorize every selected layer with ``decompose``; ranks uniform or allocated.

    All or nothing: if any layer fails, the layers already replaced are put back.
    """
    from slimline.factorize.allocate import allocate_ranks

    calibration = ctx.calibration or []
    if cfg.requires_calibration() and not calibration:
        raise ValueError(f"{cfg.method} needs calibration data")
    chosen = dict(cfg.select_modules(model))
    plan = allocate_ranks(model, chosen, cfg, decompose, ctx) if cfg.allocation == "sensitivity" \
        else None
    dense: list[str] = []
    with undone_on_failure(model) as swaps:

        def factorize(name: str, module: nn.Module, stats: FactorStats | None) -> None:
            w = linear_weight(module).detach().double()  # (N, K)
            dec = decompose(w, stats)
            n, k = w.shape
            rank = cfg.uniform_rank(n, k, dec.values) if plan is None else plan.ranks[name]
            if rank > max_saving_rank(n, k):
                dense.append(name)
            else:
                replace_layer(swaps, name, module, dec, rank)

        if cfg.requires_calibration():

            def update(group: dict[str, nn.Module], stats: dict[str, FactorStats]) -> None:
                for name, module in group.items():
                    factorize(name, module, stats[name])

            sequential_layers(model, chosen, calibration, lambda _n, m: cfg.stats_for(m),
                              update, progress=ctx.progress, desc=cfg.method)
        else:
            for name, module in chosen.items():
                factorize(name, module, None)
    done = [n for n in chosen if n not in dense]
    return StepOutcome(modules=done, notes=_notes(model, chosen, done, dense, cfg, plan))


def _notes(
    model: nn.Module, chosen: dict[str, nn.Module], done: list[str], dense: list[str],
    cfg: LowRankConfig, plan: object | None,
) -> list[str]:
    before = sum(linear_weight(m).numel() for m in chosen.values())
    after = sum(
        linear_weight(chosen[n]).numel() if n in dense else
        sum(p.numel() for p in model.get_submodule(n).parameters() if p.dim() == 2)
        for n in chosen
    )
    ranks = [int(getattr(model.get_submodule(n), "rank", 0)) for n in done]
    notes = [f"{len(done)} layers factorized, ranks {min(ranks, default=0)}–{max(ranks, default=0)}"
             f" ({cfg.allocation}); weights kept: {after / max(before, 1):.4f} of {before}"]
    if dense:
        notes.append(f"{len(dense)} layers kept dense (no rank of theirs saves parameters): "
                     + ", ".join(dense[:5]) + (" ..." if len(dense) > 5 else ""))
    if plan is not None:
        notes.append(str(plan))
    return notes
