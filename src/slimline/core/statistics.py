"""Running statistics of a layer's inputs, fed batch by batch from forward hooks.

One accumulator serves Wanda (the per-feature squared norms) and SparseGPT (the Hessian
H = 2/n · Σ x xᵀ of the layer-wise least-squares problem, arXiv 2301.00774 §3): both are sums
over tokens, so calibration activations are never kept.
"""

from __future__ import annotations

import torch


class InputStats:
    """Accumulates Σ x² per feature and, optionally, X Xᵀ over all input tokens."""

    def __init__(self, in_features: int, *, hessian: bool) -> None:
        self.tokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64)
        self.xxt = torch.zeros(in_features, in_features) if hessian else None

    def add_batch(self, x: torch.Tensor) -> None:
        """``x`` (..., in): every leading position is one token."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sq_norm.device != flat.device:  # follow the activations (CPU or GPU)
            self.sq_norm = self.sq_norm.to(flat.device)
            self.xxt = self.xxt.to(flat.device) if self.xxt is not None else None
        self.tokens += flat.shape[0]
        self.sq_norm += flat.pow(2).sum(0).double()
        if self.xxt is not None:
            self.xxt += flat.t() @ flat

    @property
    def input_norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature (in,)."""
        return self.sq_norm.sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n · X Xᵀ (in, in)."""
        if self.xxt is None or self.tokens == 0:
            raise ValueError("no Hessian: accumulator built without it or fed no tokens")
        return self.xxt * (2.0 / self.tokens)


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = ``dampening`` · mean(diag H).

    Its rows drive the column-by-column OBS updates of SparseGPT (arXiv 2301.00774) and GPTQ
    (arXiv 2210.17323, Algorithm 1), replacing repeated inverse downdates.
    """
    h = hessian.clone().float()
    damp = dampening * torch.mean(torch.diag(h)).clamp_min(1e-8)
    h += torch.eye(h.shape[0], device=h.device) * damp
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)
