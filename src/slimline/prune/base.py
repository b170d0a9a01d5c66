"""What the unstructured pruners share: their fields, and the layer-by-layer calibration loop.

``prune_layerwise`` walks a transformer block by block (``core.calibration.sequential_layers``):
the inputs of each block's layers are summarised in :class:`InputStats`, the layers are
pruned, and the pruned block's outputs feed the next block, as in SparseGPT and Wanda's
reference code. Only one block's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimline.core.calibration import sequential_layers
from slimline.core.config import MethodConfig
from slimline.core.registry import StepContext, StepOutcome
from slimline.core.statistics import InputStats
from slimline.core.targets import linear_weight, set_linear_weight
from slimline.prune.masks import parse_pattern
from slimline.prune.owl import owl_layer_sparsity

PruneFn = Callable[[torch.Tensor, InputStats, float], torch.Tensor]  # (W, stats, sparsity)


@dataclass(frozen=True, kw_only=True)
class UnstructuredPruneConfig(MethodConfig):
    """Fields shared by unstructured / N:M pruners (names from ARCHITECTURE.md)."""

    sparsity: float = 0.5
    # "2:4" etc.; when set it replaces `sparsity` (N:M fixes the density at N/M).
    pattern: str | None = None
    # OWL (arXiv 2310.05175): per-block sparsity from the share of outlier Wanda scores.
    owl: bool = False
    # λ: the per-block sparsities spread over at most 2λ around `sparsity` (paper: 0.08).
    owl_lambda: float = 0.08
    # M: a score is an outlier above M × its layer's mean (paper: 5).
    owl_m: float = 5.0

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            self.fail("sparsity", f"{self.sparsity} is outside [0, 1)")
        if self.pattern is not None:
            try:
                parse_pattern(self.pattern)
            except ValueError as exc:
                self.fail("pattern", str(exc))
            if self.owl:
                self.fail("owl", "OWL sets unstructured sparsities; it does not apply to N:M")
        if not 0.0 <= self.owl_lambda < 0.5:
            self.fail("owl_lambda", f"{self.owl_lambda} is outside [0, 0.5)")
        if self.owl_m <= 0:
            self.fail("owl_m", f"must be > 0, got {self.owl_m}")

    def requires_calibration(self) -> bool:
        return self.needs_calibration or self.owl

    def layer_sparsities(
        self, model: nn.Module, layers: dict[str, nn.Module], ctx: StepContext
    ) -> dict[str, float]:
        """Sparsity per layer: uniform, or OWL's outlier-weighted one (dense-model pass)."""
        if not self.owl:
            return dict.fromkeys(layers, self.sparsity)
        if not ctx.calibration:
            raise ValueError(f"{self.method}: owl needs calibration data")
        return owl_layer_sparsity(
            model, layers, ctx.calibration, sparsity=self.sparsity, lam=self.owl_lambda,
            m=self.owl_m,
        )

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        chosen = super().select_modules(model, step=step)
        if self.pattern is not None:
            _, m = parse_pattern(self.pattern)
            for name, module in chosen:
                width = linear_weight(module).shape[1]
                if width % m:
                    self.fail("pattern", f"{name} has {width} inputs, not divisible by {m}")
        return chosen


def prune_layerwise(
    model: nn.Module,
    cfg: UnstructuredPruneConfig,
    ctx: StepContext,
    prune: PruneFn,
    *,
    hessian: bool,
) -> StepOutcome:
    """Prune every selected layer with ``prune(weight, stats, sparsity)``, block by block."""
    if not ctx.calibration:
        raise ValueError(f"{cfg.method} needs calibration data")
    chosen = dict(cfg.select_modules(model))
    sparsities = cfg.layer_sparsities(model, chosen, ctx)

    def make(_name: str, module: nn.Module) -> InputStats:
        return InputStats(linear_weight(module).shape[1], hessian=hessian)

    def update(group: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
        for name, module in group.items():
            weight = linear_weight(module).detach()
            set_linear_weight(module, prune(weight, stats[name], sparsities[name]))

    sequential_layers(model, list(chosen), ctx.calibration, make, update, progress=ctx.progress,
                      desc=cfg.method, share_inputs=True)
    zeros = sum(int((linear_weight(m) == 0).sum()) for m in chosen.values())
    total = sum(linear_weight(m).numel() for m in chosen.values())
    return StepOutcome(
        modules=list(chosen), notes=[f"sparsity of pruned layers: {zeros / max(total, 1):.4f}"]
    )
