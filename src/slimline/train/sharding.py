"""FSDP2 for the training loop: the trained model sharded over the ranks for one run, then whole.

With ``sharding: fsdp`` under ``torchrun``, torch's ``fully_shard`` (FSDP2; Zhao et al., PyTorch
FSDP, arXiv 2304.11277) wraps each block of the model (the classes a Hugging Face model's
``_no_split_modules`` names, else the entries of its ``ModuleList``s) and then the model itself.
Each rank then holds 1/W of every parameter, of its gradient and of the optimizer state; a
block's full parameters exist only during its forward and backward (all-gathered, then freed)
and the gradients are reduce-scattered, so every rank updates its own shard of the same step.

The run's start and end are this module's: rank 0's values are broadcast first (as DDP does,
so ranks that loaded different weights still train one model), and at the end (or on failure)
the shards are gathered back into the model's own ``Parameter`` objects and the wrapping is
taken off, so that the caller gets the model it passed, whole, with every reference it held
still valid. Parameters the loop trains that live outside the model (distillation's learned
projections) stay whole on every rank and their gradients are averaged.

Taking the wrapping off is not a public torch API: ``fully_shard`` swaps each wrapped module's
class for a subclass and adds hooks and state to the module's ``__dict__``. :class:`Sharded`
records every module's class, ``__dict__`` keys and hook keys before wrapping and restores
exactly those, then checks that no DTensor is left (``tests/train/test_sharding.py`` runs it
against the torch this project pins).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of ``t`` (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) laid out as ``like``: a DTensor
    of ``value``'s dtype with ``like``'s mesh and placements, each rank keeping its own part
    without any communication; ``value`` itself when ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh,  # type: ignore[attr-defined]
                             like.placements, src_data_rank=None)  # type: ignore[attr-defined]  # fmt: skip


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself for a plain tensor): writes to it change ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units to shard one by one: instances of the classes the model's
    ``_no_split_modules`` names (Hugging Face's own list of blocks not to split), else every
    entry of every ``ModuleList`` (outermost lists only) that holds parameters."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if found:
            return found
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for entry in module:
            if any(True for _ in entry.parameters()):
                units.append(entry)
            inside.update(id(m) for m in entry.modules())
    return units


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does, over plain and sharded gradients together."""
    with_grad = [p for p in params if p.grad is not None]
    parts = [[p for p in with_grad if is_dtensor(p.grad)],  # type: ignore[arg-type]
             [p for p in with_grad if not is_dtensor(p.grad)]]  # type: ignore[arg-type]  # fmt: skip
    parts = [part for part in parts if part]
    if not parts:
        return
    squares = torch.zeros((), dtype=torch.float64)
    for part in parts:
        norm = full(torch.nn.utils.get_total_norm([p.grad for p in part]))  # type: ignore[misc]
        squares = squares + norm.double().cpu() ** 2
    total = squares.sqrt().float()
    for part in parts:  # separately: torch's foreach kernels take no mix of the two
        torch.nn.utils.clip_grads_with_norm_(part, max_norm, total)

class Sharded:
    """``model`` under ``fully_shard`` from construction to :meth:`close`.

    :attr:`groups` are the caller's param groups with the model's parameters replaced by
    their sharded counterparts (the optimizer's); ``extras`` are the trained parameters the
    model does not hold. Every method that gathers or averages is a collective.
    """

    def __init__(self, model: nn.Module, groups: Sequence[dict[str, Any]]) -> None:
        from torch.distributed.fsdp import fully_shard

        self.model = model
        self._broadcast_from_rank0(model)
        self._saved = {id(m): (m, type(m), set(m.__dict__), _hook_keys(m)) for m in model.modules()}
        self._owners = [(m, name, p) for m in model.modules()
                        for name, p in m._parameters.items() if p is not None]  # fmt: skip
        names = {id(p): n for n, p in model.named_parameters()}
        units = blocks(model)
        try:
            for unit in units:
                fully_shard(unit)
            fully_shard(model)
        except BaseException:
            self._unwrap({})
            raise
        now = dict(model.named_parameters())
        self.extras: list[torch.Tensor] = []
        self.groups: list[dict[str, Any]] = []
        for group in groups:
            params = []
            for p in group["params"]:
                if id(p) in names:
                    params.append(now[names[id(p)]])
                else:
                    params.append(p)
                    self.extras.append(p)
            self.groups.append({**group, "params": params})
        for _, _, p in self._owners:  # the shards hold the values now; free the originals
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @staticmethod
    @torch.no_grad()
    def _broadcast_from_rank0(model: nn.Module) -> None:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)

    def average_extras(self) -> None:
        """Average the gradients of the parameters outside the model over the ranks."""
        size = dist.get_world_size()
        for p in self.extras:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(size)

    def close(self) -> None:
        """Gather every parameter whole into the model's own ``Parameter`` objects, take the
        wrapping off and check that nothing sharded is left."""
        values: dict[int, torch.Tensor] = {}
        for module, name, p in self._owners:
            if id(p) not in values:
                values[id(p)] = full(module._parameters[name].detach())  # type: ignore[union-attr]
        self._unwrap(values)

    def _unwrap(self, values: dict[int, torch.Tensor]) -> None:
        for module, cls, keys, hooks in self._saved.values():
            if type(module) is not cls:
                module.__class__ = cls
            for key in set(module.__dict__) - keys:
                del module.__dict__[key]
            for attr, before in hooks.items():
                table = module.__dict__[attr]
                for key in set(table) - before:
                    del table[key]
        for module, name, p in self._owners:
            if id(p) in values:
                p.data = values[id(p)].to(p.dtype)
            module._parameters[name] = p
        left = [n for n, t in self.model.state_dict(keep_vars=True).items() if is_dtensor(t)]
        if left:
            raise RuntimeError(f"sharding: {left[:3]} still sharded after the run; torch "
                               f"{torch.__version__} wraps modules unlike 2.13")  # fmt: skip


def _hook_keys(module: nn.Module) -> dict[str, set[Any]]:
    return {attr: set(module.__dict__[attr]) for attr in HOOK_DICTS if attr in module.__dict__}

