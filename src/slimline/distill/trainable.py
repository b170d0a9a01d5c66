"""Which parameters a recovery step trains, and the sparsity they must keep.

``all`` trains every floating-point parameter of the selected modules; ``norms_and_biases``
only the normalisation layers' parameters and the biases, which PERP (Zimmer et al., arXiv
2312.15230) finds recovers most of a pruned model's quality at a fraction of the memory.
Quantized layers (any layer class of :mod:`slimline.quantize`: ``QuantLinear``, the W8A8
and fp8 layers) hold packed integer codes and stay frozen.

A weight pruned to zero stays exactly zero: the zero pattern of each trained Linear-like
weight is recorded before training, its gradient is masked (so optimizer moments stay zero
there) and the pattern is written again after each optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from slimline.core.targets import is_linear_like
from slimline.train.sharding import local, shard_like


def is_quantized_layer(module: nn.Module) -> bool:
    """A slimline quantized layer: trained only through ``qat``, frozen here."""
    return type(module).__module__.startswith("slimline.quantize")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm, BatchNorm and the Hugging Face ``*Norm`` classes."""
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
    return isinstance(module, kinds) or type(module).__name__.endswith("Norm")


def holds_trainable(module: nn.Module) -> bool:
    """Whether ``module`` has floating-point parameters of its own and is not quantized."""
    if is_quantized_layer(module):
        return False
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def trainable_parameters(
    modules: Iterable[tuple[str, nn.Module]], mode: str
) -> dict[str, nn.Parameter]:
    """``name → parameter`` trained in ``mode`` (``all`` or ``norms_and_biases``) among
    ``modules``' own parameters, each once (tied weights are one parameter)."""
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in modules:
        if not holds_trainable(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            keep = mode == "all" or is_norm(module) or pname == "bias"
            if keep and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                chosen[f"{name}.{pname}" if name else pname] = p
    return chosen


class SparsityMasks:
    """The zero patterns of the trained Linear-like weights, kept exact through training.

    The weights are looked up on their modules at each use, so that the masks follow them
    when the loop shards the model (FSDP2: the weight is then a DTensor and each rank masks
    its own shard)."""

    def __init__(self, model: nn.Module, trained: dict[str, nn.Parameter]) -> None:
        ids = {id(p) for p in trained.values()}
        self.masks: list[tuple[nn.Module, torch.Tensor]] = []
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if is_linear_like(module) and isinstance(weight, nn.Parameter) and id(weight) in ids:
                zeros = weight.detach() == 0
                if bool(zeros.any()):
                    self.masks.append((module, zeros))

    def __len__(self) -> int:
        return len(self.masks)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of the pruned weights (the loop's ``before_update``: after the
        gradients are averaged over the ranks, before clipping and the optimizer step)."""
        for module, zeros in self.masks:
            grad = _weight(module).grad
            if grad is not None:
                local(grad).masked_fill_(local(shard_like(zeros, grad)), 0)

    @torch.no_grad()
    def reapply(self, _step: int = 0) -> None:
        """Write the zeros again (after each optimizer step)."""
        for module, zeros in self.masks:
            weight = _weight(module)
            local(weight).masked_fill_(local(shard_like(zeros, weight)), 0)


def _weight(module: nn.Module) -> torch.Tensor:
    """The module's weight, read where it is now (a DTensor while the loop shards it)."""
    return cast(torch.Tensor, module.weight)
