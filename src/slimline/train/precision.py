"""Mixed precision for the training loop: bf16 autocast and float32 master weights.

Autocast runs the matrix products in bfloat16 while the parameters stay as they are; when
the parameters themselves are bf16/fp16, an update smaller than half their last-bit step
rounds away. Mixed-precision training (Micikevicius et al., arXiv 1710.03740, §3.1) keeps a
float32 master copy the optimizer updates and copies it back, rounded, after each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def autocast(params: Sequence[torch.Tensor], enabled: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on the device of ``params`` (CPU or GPU) when ``enabled``."""
    if not enabled:
        return nullcontext()
    device = params[0].device.type if params else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


class MasterWeights:
    """float32 copies of the low-precision parameters of ``param_groups`` for the optimizer.

    :attr:`groups` are the param groups to build the optimizer on: float32 parameters are
    their own masters, bf16/fp16 ones are replaced by float32 copies. After ``backward``,
    :meth:`gradients_to_masters`; after the optimizer step, :meth:`masters_to_params`.
    """

    def __init__(self, param_groups: Sequence[dict[str, Any]]) -> None:
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.groups: list[dict[str, Any]] = []
        for group in param_groups:
            masters = [self._master(p) for p in group["params"]]
            self.groups.append({**group, "params": masters})

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        if p.dtype not in LOW_PRECISION:
            return p
        master = p.detach().float().clone().requires_grad_(True)
        self.pairs.append((p, master))
        return master

    @property
    def active(self) -> bool:
        return bool(self.pairs)

    def gradients_to_masters(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)  # rounds to p's dtype


def is_low_precision(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``params`` is bf16/fp16 (then master weights matter)."""
    return any(p.dtype in LOW_PRECISION for p in params)
