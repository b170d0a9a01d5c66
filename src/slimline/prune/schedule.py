"""Gradual pruning during training with the cubic schedule (Zhu & Gupta, arXiv 1710.01878).

The sparsity rises from ``initial`` to ``final`` between ``begin`` and ``end`` steps as

    s_t = s_f + (s_i − s_f) · (1 − (t − t_0) / (t_end − t_0))³

pruning fast while many redundant weights remain, slowly near the target. Every
``frequency`` steps the masks are recomputed by magnitude on the current weights; between
updates the masks are re-applied after each optimizer step so pruned weights stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimline.core.targets import Targets, linear_weight, select
from slimline.prune.importance import magnitude_score
from slimline.prune.masks import unstructured_mask


def cubic_sparsity(step: int, *, begin: int, end: int, initial: float, final: float) -> float:
    """Target sparsity at ``step`` (constant before ``begin`` and after ``end``)."""
    if end <= begin:
        raise ValueError(f"schedule: end ({end}) must be after begin ({begin})")
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass
class CubicSchedule:
    """When and how far to prune: steps ``begin``..``end``, masks updated every ``frequency``."""

    final: float
    begin: int
    end: int
    initial: float = 0.0
    frequency: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ValueError("schedule: need 0 <= initial <= final < 1")
        if self.frequency < 1:
            raise ValueError("schedule: frequency must be >= 1")
        cubic_sparsity(self.begin, begin=self.begin, end=self.end, initial=0, final=0)

    def sparsity(self, step: int) -> float:
        return cubic_sparsity(
            step, begin=self.begin, end=self.end, initial=self.initial, final=self.final
        )


class GradualPruner:
    """Keeps magnitude masks on a model's Linear-like layers while it trains.

    Call :meth:`step` after every optimizer step: it recomputes the masks when the schedule
    says so and re-applies them, so the weights the optimizer moved stay zero.
    """

    def __init__(self, model: nn.Module, schedule: CubicSchedule, targets: Targets | None = None):
        self.schedule = schedule
        self.layers = select(model, targets or Targets(), step="gradual pruning")
        self.masks: dict[str, torch.Tensor] = {}

    def step(self, step: int) -> float:
        """Update (if due) and apply the masks for ``step``; returns the target sparsity."""
        plan = self.schedule
        target = plan.sparsity(step)
        due = step >= plan.begin and (step - plan.begin) % plan.frequency == 0
        if due or step == plan.end:
            for name, module in self.layers:
                self.masks[name] = unstructured_mask(magnitude_score(linear_weight(module)), target)
        with torch.no_grad():
            for name, module in self.layers:
                if name in self.masks:
                    linear_weight(module).mul_(self.masks[name].to(linear_weight(module).dtype))
        return target
