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
