"""Mask selection from importance scores: unstructured (per layer or global) and N:M.

A mask is a bool tensor shaped like the scores, True = keep. Selection is exact: a layer
pruned to sparsity s has exactly ``round(s * numel)`` zeros, ties broken by position, so the
asked sparsity is what the user gets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → (2, 4): keep N of every M consecutive input weights. ValueError if bad."""
    match = _PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"pattern {pattern!r} is not of the form 'N:M' (e.g. '2:4')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m


def n_pruned(numel: int, sparsity: float) -> int:
    """How many weights a sparsity removes from ``numel`` (rounded to nearest)."""
    return round(sparsity * numel)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``round(sparsity·numel)`` lowest-scoring entries."""
    k = n_pruned(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        order = torch.argsort(scores.flatten(), stable=True)
        mask[order[:k]] = False
    return mask.view_as(scores)


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row (Wanda's comparison group): each row loses its lowest scores.

    Row r loses ``round(s·in·(r+1)) − round(s·in·r)`` weights, so every row is within one
    weight of the asked share and the layer total is exactly ``round(s·numel)``.
    """
    rows, cols = scores.shape
    bounds = torch.round(sparsity * cols * torch.arange(rows + 1, dtype=torch.float64))
    per_row = (bounds[1:] - bounds[:-1]).long()  # (out,)
    order = torch.argsort(scores, dim=1, stable=True)  # (out, in), lowest score first
    pruned_sorted = torch.arange(cols).unsqueeze(0) < per_row.unsqueeze(1)  # (out, in)
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, ~pruned_sorted)


def global_masks(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One threshold across all layers: the lowest ``sparsity`` share of all scores goes."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = unstructured_mask(flat, sparsity)
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].view_as(s))
        start += s.numel()
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask on (out, in) scores: in each run of M inputs keep the top N."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/M, M)
    top = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, cols)
