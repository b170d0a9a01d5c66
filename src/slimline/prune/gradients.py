"""Gradient statistics of a loss on calibration data, for the gradient-based importance scores.

For each chosen layer's (out, in) weight it accumulates, over calibration batches b:
the mean gradient ḡ (first-order Taylor), the mean squared gradient E[g²] (empirical Fisher
diagonal), and optionally a Hutchinson estimate of the loss Hessian's diagonal,
E_z[z ⊙ Hz] with Rademacher z (Bekas et al. 2007), from Hessian-vector products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimline.core.batches import Batch, forward, split_labels
from slimline.core.targets import is_conv1d

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The task loss: next-token cross-entropy for causal LMs, cross-entropy with labels.

    Causal LMs (dict batches with ``input_ids`` and logits of shape (B, T, V)) predict the
    next token; classifiers need a ``labels`` entry. Anything else has no loss to offer.
    """
    inputs, labels = split_labels(batch)
    out: Any = forward(model, inputs)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError("gradient scores need a loss: the model returns no logits")
    if labels is not None:
        return nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())
    if isinstance(inputs, dict) and "input_ids" in inputs and logits.dim() == 3:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100) if mask is not None else ids[:, 1:]
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100
        )
    raise ValueError("gradient scores need a loss: give batches with 'labels' or a causal LM")


@dataclass
class GradientStats:
    """Per-layer gradient moments, (out, in) each, after :func:`gradient_statistics`."""

    grad_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_sq_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_diag: dict[str, torch.Tensor] = field(default_factory=dict)


def _weight_view(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.t() if is_conv1d(module) else t  # always (out, in)


def gradient_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[Batch],
    *,
    loss_fn: LossFn = default_loss,
    hutchinson_samples: int = 0,
) -> GradientStats:
    """Accumulate gradient moments of ``loss_fn`` for ``layers``' weights over ``batches``."""
    if not batches:
        raise ValueError("gradient scores need calibration data")
    weights: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name}.weight is not a tensor")
        weights[name] = weight
    flags = {n: w.requires_grad for n, w in weights.items()}
    stats = GradientStats()
    was_training = model.training
    model.eval()
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            need_graph = hutchinson_samples > 0
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=need_graph)
            for (name, module), g in zip(layers.items(), grads, strict=True):
                g2 = _weight_view(module, g.detach()).float()
                n = len(batches)
                stats.grad_mean[name] = stats.grad_mean.get(name, 0) + g2 / n
                stats.grad_sq_mean[name] = stats.grad_sq_mean.get(name, 0) + g2.pow(2) / n
            for _ in range(hutchinson_samples):
                zs = [torch.randint_like(w, 2) * 2 - 1 for w in weights.values()]
                hvps = torch.autograd.grad(grads, list(weights.values()), zs, retain_graph=True)
                for (name, module), z, hz in zip(layers.items(), zs, hvps, strict=True):
                    est = _weight_view(module, (z * hz).detach()).float()
                    scale = hutchinson_samples * len(batches)
                    stats.hessian_diag[name] = stats.hessian_diag.get(name, 0) + est / scale
    finally:
        for name, weight in weights.items():
            weight.requires_grad_(flags[name])
        model.train(was_training)
    return stats
