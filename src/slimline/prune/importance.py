"""Importance scores: how much each weight matters. Kept apart from selection and surgery.

Every score is a pure function returning a tensor shaped like the (out, in) weight; a higher
score means keep. Selection (``masks.py``) turns scores into masks.
"""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W|, the classic magnitude criterion (Han et al., arXiv 1506.02626). (out, in)."""
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (Wanda, arXiv 2306.11695 eq. 1).

    ``weight`` (out, in); ``input_norm`` (in,) the L2 norm of each input feature over all
    calibration tokens. Weights fed by large activations matter more than their size says.
    """
    return weight.detach().abs().float() * input_norm.float().unsqueeze(0)


def taylor_score(weight: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    """|W ⊙ ḡ|: first-order Taylor estimate of the loss change when a weight is zeroed
    (Molchanov et al., arXiv 1906.10771). ``grad_mean`` (out, in) over calibration batches."""
    return (weight.detach().float() * grad_mean.float()).abs()


def fisher_score(weight: torch.Tensor, grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """½ W² ⊙ E[g²]: the second-order term with the empirical Fisher as the Hessian's diagonal
    (Theis et al., arXiv 1801.05787)."""
    return 0.5 * weight.detach().float().pow(2) * grad_sq_mean.float()


def obd_score(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """½ h_ii w_i²: Optimal Brain Damage saliency (LeCun et al., NeurIPS 1989) with the loss
    Hessian's diagonal (e.g. a Hutchinson estimate); negative curvature estimates clip to 0."""
    return 0.5 * weight.detach().float().pow(2) * hessian_diag.float().clamp_min(0)
