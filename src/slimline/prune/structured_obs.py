"""Which structured units to remove: greedy Optimal Brain Surgeon over the consumer layers.

A unit (head, neuron) is a set of input columns of the layer that consumes it. Removing a set
S of columns from a Linear ``W`` (inputs ``x̃ = [x; 1]``, ``H = Σ x̃ x̃ᵀ``) and refitting the
rest by least squares, as ``surgery.refit_consumer`` does, leaves the output error

    E(S) = tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)

(Optimal Brain Surgeon, Hassibi & Stork 1993, for a whole block of columns; ZipLM, arXiv
2302.04089 §3, applies it to heads and neurons). Wanda-style scores rank each unit alone and
ignore that correlated units stand in for each other once the layer is refit; this ranks them
by the error that the refit actually leaves. Units go greedily: each round removes the units
with the smallest error given the removals so far, then updates ``W`` and ``H⁻¹`` as OBS does

    W ← W − W_S (H⁻¹_SS)⁻¹ H⁻¹_S·,   H⁻¹ ← H⁻¹ − H⁻¹_·S (H⁻¹_SS)⁻¹ H⁻¹_S·

(the second is the inverse of H with S's rows and columns deleted). A round removes
``ceil(n_remove / rounds)`` units at once, so large layers cost ``rounds`` passes over H⁻¹, not
one per unit. All maths in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Consumer:
    """One consumer layer of a group, as OBS sees it.

    ``weight`` (out, d) with the bias as its last column when the layer has one; ``hessian``
    (d, d) over the same inputs (the constant 1 last when there is a bias); ``width`` columns
    per unit, unit ``u`` owning columns ``[u·width, (u+1)·width)``.
    """

    weight: torch.Tensor
    hessian: torch.Tensor
    width: int


def damped_inverse(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """(H + λI)⁻¹ in float64, λ = ``dampening`` · mean(diag H), as GPTQ and the refit damp."""
    h = hessian.double()
    lam = dampening * h.diagonal().mean().clamp_min(1e-12)
    return torch.cholesky_inverse(torch.linalg.cholesky(h + lam * torch.eye(len(h), dtype=h.dtype)))


def unit_errors(weight: torch.Tensor, hinv: torch.Tensor, n_units: int, width: int) -> torch.Tensor:
    """(n_units,) OBS error of removing each unit alone: tr(W_u (H⁻¹_uu)⁻¹ W_uᵀ).

    ``weight`` (out, d), ``hinv`` (d, d), the units' columns the first ``n_units · width``.
    Units already removed (zero diagonal block) get +inf.
    """
    cols = n_units * width
    w = weight[:, :cols].reshape(weight.shape[0], n_units, width).permute(1, 2, 0)  # (n, w, out)
    diag = hinv[:cols, :cols].reshape(n_units, width, n_units, width)
    blocks = diag[torch.arange(n_units), :, torch.arange(n_units), :]  # (n, w, w)
    gone = blocks.diagonal(dim1=1, dim2=2).abs().amax(1) <= 0
    safe = torch.where(gone[:, None, None], torch.eye(width, dtype=blocks.dtype), blocks)
    err = (w * torch.linalg.solve(safe, w)).sum((1, 2))  # Σ_o w_oᵀ B⁻¹ w_o
    return err.masked_fill(gone, math.inf)


def remove_columns_(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """In place: the OBS update of ``weight`` (out, d) and ``hinv`` (d, d) for removing ``cols``;
    afterwards their columns (and H⁻¹'s rows) are zero."""
    block = hinv[cols][:, cols]  # (k, k)
    rows = hinv[cols]  # (k, d)
    coef = torch.linalg.solve(block, rows)  # (H⁻¹_SS)⁻¹ H⁻¹_S·: (k, d)
    weight -= weight[:, cols] @ coef
    hinv -= rows.T @ coef
    weight[:, cols] = 0
    hinv[cols] = 0
    hinv[:, cols] = 0


def obs_keep(
    consumers: list[Consumer],
    n_units: int,
    n_remove: int,
    *,
    partitions: int = 1,
    rounds: int = 64,
    dampening: float = 0.01,
) -> torch.Tensor:
    """Indices of the units kept (ascending) after greedily removing ``n_remove`` of ``n_units``
    by their summed OBS error over ``consumers``; each of ``partitions`` equal runs of units
    loses ``n_remove / partitions``. Ties go to the earlier unit."""
    if n_remove % partitions or n_units % partitions:
        raise ValueError(f"{n_remove} removals do not split over {partitions} partitions")
    state = [(c.weight.detach().double().clone(), damped_inverse(c.hessian, dampening), c.width)
             for c in consumers]
    per_partition = n_units // partitions
    quota = torch.full((partitions,), n_remove // partitions)
    removed = torch.zeros(n_units, dtype=torch.bool)
    per_round = max(1, math.ceil(n_remove / rounds))
    while int(quota.sum()) > 0:
        err = torch.stack([unit_errors(w, h, n_units, width) for w, h, width in state]).sum(0)
        err = err.masked_fill(removed, math.inf)
        chosen: list[int] = []
        taken = torch.zeros(partitions, dtype=torch.long)
        for u in torch.argsort(err, stable=True).tolist():
            p = u // per_partition
            if len(chosen) == per_round or removed[u]:
                break
            if taken[p] < quota[p]:
                chosen.append(u)
                taken[p] += 1
        units = torch.tensor(chosen)
        for w, h, width in state:
            cols = (units[:, None] * width + torch.arange(width)).flatten()
            remove_columns_(w, h, cols)
        removed[units] = True
        quota -= taken
    return (~removed).nonzero().flatten()
