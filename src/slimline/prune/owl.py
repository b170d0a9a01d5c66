"""OWL: outlier-weighted layer-wise sparsity (Yin et al., arXiv 2310.05175).

Layers whose Wanda scores |W|·‖X‖ hold more outliers (entries above ``m`` × the layer mean)
matter more, so they get a lower sparsity. The outlier ratios D_l are mapped linearly onto
keep-ratios spanning ``2·λ`` and shifted so their mean is ``1 − sparsity`` (§3, eq. 4 and the
authors' release); the average sparsity over layers is unchanged. A "layer" is a block of the
model (all its pruned Linear layers share one ratio), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.core.calibration import capture_inputs, find_blocks
from slimline.core.statistics import InputStats
from slimline.core.targets import linear_weight
from slimline.prune.importance import wanda_score


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Share of entries of ``scores`` greater than ``m`` times their mean (D_l)."""
    flat = scores.flatten().float()
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from outlier ratios: mean ``sparsity``, spread at most ``2λ``."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = d.max() - d.min()
    keep = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    keep = keep - keep.mean() + (1.0 - sparsity)
    return [min(max(1.0 - float(k), 0.0), 0.99) for k in keep]


def _block_of(name: str, prefix: str) -> str:
    """``model.layers.3.mlp.up_proj`` → ``model.layers.3``; outside the blocks: the name."""
    if prefix and name.startswith(prefix + "."):
        index = name[len(prefix) + 1 :].split(".", 1)[0]
        return f"{prefix}.{index}"
    return name


def owl_layer_sparsity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Sequence[Batch],
    *,
    sparsity: float,
    lam: float,
    m: float,
) -> dict[str, float]:
    """Sparsity for every layer in ``layers`` from one calibration pass on the dense model."""
    stats = {n: InputStats(linear_weight(mod).shape[1], hessian=False) for n, mod in layers.items()}
    capture_inputs(model, layers, calibration, lambda n, x: stats[n].add_batch(x))
    try:
        prefix = find_blocks(model)[0]
    except ValueError:
        prefix = ""
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(_block_of(name, prefix), []).append(name)
    ratios = []
    for names in groups.values():
        scores = torch.cat([
            wanda_score(linear_weight(layers[n]), stats[n].input_norm).flatten() for n in names
        ])
        ratios.append(outlier_ratio(scores, m))
    per_group = owl_sparsities(ratios, sparsity, lam)
    return {n: s for names, s in zip(groups.values(), per_group, strict=True) for n in names}
