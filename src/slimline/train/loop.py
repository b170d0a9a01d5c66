"""The training loop: Adam with a cosine schedule over a seeded batch order, one or N ranks.

Under ``torchrun`` (``torch.distributed`` initialised, gloo on CPU) every rank runs this same
code on its own model copy: rank ``r`` of ``W`` takes the batches ``t·W + r`` of a shared,
seeded order at step ``t``, gradients are averaged with one ``all_reduce`` per step, and
parameters start from rank 0's, so all ranks end identical. One process is the case ``W = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Average ``params``' gradients over the ranks: one ``all_reduce`` of a flat vector."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def batch_order(n_batches: int, length: int, seed: int) -> list[int]:
    """``length`` batch indices: seeded permutations of ``range(n_batches)``, one per epoch."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < length:
        order.extend(torch.randperm(n_batches, generator=g).tolist())
    return order[:length]


def train_loop(
    param_groups: Sequence[dict[str, Any]],
    step_loss: Callable[[int], torch.Tensor],
    n_batches: int,
    *,
    steps: int,
    seed: int,
    name: str,
    lr_fields: str = "lr",
    progress: bool = False,
) -> list[float]:
    """Run ``steps`` Adam steps on ``param_groups``; returns the step losses.

    ``step_loss(i)`` is the loss on batch ``i`` (of ``n_batches``); the learning rates of the
    groups follow a cosine from their value to 0. ``name`` labels the progress bar and errors,
    ``lr_fields`` the config fields to lower should the loss stop being finite.
    """
    rank, size = world()
    params = [p for group in param_groups for p in group["params"]]
    if size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)
    optimizer = torch.optim.Adam([dict(g) for g in param_groups], fused=True)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps))
    )
    order = batch_order(n_batches, steps * size, seed)
    losses = []
    for step in tqdm(range(steps), desc=name, disable=not progress, leave=False):
        loss = step_loss(order[step * size + rank])
        if not torch.isfinite(loss):
            raise ValueError(f"{name}: the loss became {loss.item()} at step {step}; "
                             f"lower {lr_fields}")  # fmt: skip
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        average_gradients(params, size)
        optimizer.step()
        cosine.step()
        losses.append(float(loss.detach()))
    return losses
