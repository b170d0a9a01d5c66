"""Sort-free mask selection: a streaming EWMA threshold per row, and exact N:M by counting.

SwiftPrune (arXiv 2501.16376) replaces the sort that SparseGPT (arXiv 2301.00774) and Wanda
use to find each row's pruning threshold by an Exponentially Weighted Moving Average (EWMA)
over the row's scores, so that selection costs O(in) per row instead of O(in log in).

Only the paper's abstract and secondary summaries could be read when this was written
("EWMA instead of sorting", "linear time per row"), not its method section. The estimator
below is therefore this module's own design, and the reasons for each choice are given here:

* **Log domain.** Scores w²·‖x‖² span many orders of magnitude and are heavy-tailed, because
  some input features are outliers (arXiv 2208.07339). Their logarithms are roughly
  bell-shaped, so a mean and a spread describe them well enough. Zero scores go to a floor
  and are pruned first.
* **The EWMA threshold.** Walking along a row, the mean μ and variance σ² of the log-scores
  are EWMAs (decay β per step). The threshold is τ = μ + σ·(Φ⁻¹(p) + δ), the p-quantile of a
  normal with those moments, shifted by δ. δ is an EWMA correction for how far the data
  are from normal (log w² is skewed): after each step, the share of the step actually
  pruned, f, moves δ by (1-β)·(Φ⁻¹(p) - Φ⁻¹(f)).
* **Budget feedback (the count correction).** p is not the asked sparsity s. It is the
  share of the columns still ahead that the row's remaining budget, s·in minus the weights
  already pruned, calls for. So a miss early in the row is made up later and does not
  accumulate. The final count is off by about one step's sampling noise.
* **Two sweeps.** The first sweep only learns (μ, σ², δ). The second sweep decides, starting
  from what the first one learned, so the first columns are not judged on a cold estimate.
  Both sweeps are linear.
* **A step is a block of columns.** A row is streamed in K = ``steps`` blocks (fewer if a
  block would hold under 8 columns); one EWMA step takes a whole block (β applies per
  block), so the stream is vectorised across rows *and* across the block, and the number
  of kernel launches does not grow with the width. Block k holds columns k, k+K, k+2K, …,
  so every block is a spread-out sample of the row even where outlier features sit next
  to each other.

Accuracy (measured on Gaussian and heavy-tailed scores, 0.3–0.7 sparsity, 3 seeds; the test
bounds are in tests/prune/test_swiftprune.py):

=========  ===================  ===================  ==============  =====================
in         layer |achieved-s|   worst row |…|        same as exact   extra pruned mass
=========  ===================  ===================  ==============  =====================
64         ≤ 0.008              ≤ 0.06 (4 weights)   ≥ 92 %          +24 % (median)
256        ≤ 0.007              ≤ 0.03               ≥ 94 %          +9 %
1024       ≤ 0.002              ≤ 0.012              ≥ 97 %          +2 %
4096       ≤ 0.001              ≤ 0.006              ≥ 98.5 %        +0.5 %
=========  ===================  ===================  ==============  =====================

"Same as exact" is the share of keep/prune decisions equal to an exact per-row selection
(``masks.row_masks``, which sorts). "Extra pruned mass" is how much more score mass is
pruned than by that exact selection. Without the warm-up sweep the extra mass is 1.7× to 4×
larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A step takes at least this many columns, so that its share pruned is a usable signal.
_MIN_BLOCK = 8
# Rows regrouped per chunk: a transposing copy of a few MB stays in cache (2.5× faster).
_ROW_CHUNK = 256
# The offset's update keeps Φ⁻¹ finite: p and the achieved share within [ε, 1-ε] (±3.7 σ).
_P_EPS = 1e-4


def score_floor(scores: torch.Tensor) -> float:
    """A floor below every positive score (10⁻³ × the least one), so that log is finite."""
    smallest = float(scores.amin())
    if smallest <= 0:  # some zeros: look at the positive scores only
        smallest = float(torch.where(scores > 0, scores, math.inf).amin())
    return smallest * 1e-3 if math.isfinite(smallest) else 1.0


def stream_steps(cols: int, steps: int) -> int:
    """EWMA steps K over a row of ``cols``: ``steps``, fewer if blocks would be < 8 columns."""
    return max(1, min(steps, cols // _MIN_BLOCK))


@dataclass
class EwmaState:
    """Per-row EWMA state, each (rows,): mean and variance of log-scores, quantile offset δ."""

    mean: torch.Tensor
    var: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def start(cls, mean: torch.Tensor, var: torch.Tensor) -> EwmaState:
        """State from a first block's moments (rows,) alone, no offset."""
        return cls(mean.clone(), var.clone(), torch.zeros_like(mean))

    def update(self, block_mean: torch.Tensor, block_var: torch.Tensor, decay: float) -> None:
        """One EWMA step of the moments with a block's own mean and variance (rows,).

        The block's variance is taken about the updated mean (its own variance plus the
        squared gap), so a drift of the mean widens σ instead of going unnoticed.
        """
        self.mean = decay * self.mean + (1 - decay) * block_mean
        spread = block_var + (block_mean - self.mean).pow(2)
        self.var = decay * self.var + (1 - decay) * spread

    def threshold(self, p: torch.Tensor) -> torch.Tensor:
        """τ (rows,) = μ + σ·(Φ⁻¹(p) + δ); Φ⁻¹ is -∞ at p ≤ 0 (keep all), +∞ at p ≥ 1."""
        z = torch.special.ndtri(p.clamp(0.0, 1.0)) + self.offset
        return self.mean + self.var.sqrt().clamp_min(1e-12) * z

    def correct(self, p: torch.Tensor, dropped: torch.Tensor, width: int, decay: float) -> None:
        """Move δ towards the offset that would have pruned share p of the last block.

        ``dropped`` (rows,) is how many of the block's ``width`` values fell below τ.
        """
        f = (dropped / width).clamp(0.5 / width, 1 - 0.5 / width)  # (rows,) achieved share
        shift = torch.special.ndtri(p.clamp(_P_EPS, 1 - _P_EPS)) - torch.special.ndtri(f)
        live = (p > 0) & (p < 1)  # forced blocks say nothing about the distribution
        self.offset = torch.where(live, self.offset + (1 - decay) * shift, self.offset)


def ewma_threshold_mask(
    scores: torch.Tensor,
    sparsity: float,
    *,
    decay: float = 0.9,
    steps: int = 16,
    warmup: bool = True,
) -> torch.Tensor:
    """Keep-mask (rows, in): per row, prune the scores below a streaming EWMA threshold.

    Linear in the row's length, no sort; vectorised across rows. The row is streamed in
    ``steps`` blocks (fewer on narrow rows); ``decay`` is β of every EWMA, per step;
    ``warmup`` runs the learning sweep first. The achieved sparsity is close to, not
    exactly, ``sparsity`` (see the module docstring).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, in), got shape {tuple(scores.shape)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay {decay} is outside (0, 1)")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if sparsity == 0.0 or scores.numel() == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    blocks, widths = stream_blocks(scores, steps)  # (K, rows, b) log-scores, K widths
    means, variances = block_moments(blocks, widths)  # (K, rows) each
    state = EwmaState.start(means[0], variances[0])
    drops = torch.empty(blocks.shape, dtype=torch.bool, device=blocks.device)  # True = prune
    if warmup:
        _sweep(blocks, widths, means, variances, sparsity, state, decay, drops=drops)
    _sweep(blocks, widths, means, variances, sparsity, state, decay, drops=drops, decide=True)
    return _keep_in_column_order(drops, scores.shape[1])  # the decisions taken while streaming


def _keep_in_column_order(drops: torch.Tensor, cols: int) -> torch.Tensor:
    """Prune decisions (K, rows, b) → keep-mask (rows, in): the inverse of stream_blocks."""
    k_steps, rows, width = drops.shape
    keep = torch.empty(rows, width * k_steps, dtype=torch.bool, device=drops.device)
    for r in range(0, rows, _ROW_CHUNK):  # (K, rc, b) → (rc, b, K)
        chunk = keep[r : r + _ROW_CHUNK].view(-1, width, k_steps)
        torch.logical_not(drops[:, r : r + _ROW_CHUNK].permute(1, 2, 0), out=chunk)
    return keep[:, :cols]


def stream_blocks(scores: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """Log-scores (rows, in) regrouped as K contiguous blocks (K, rows, b), and valid widths.

    Block k of the stream holds columns k, k+K, k+2K, … (a spread sample of the row); the
    row is padded to K·b columns, so block k's last entry is padding when k ≥ in mod K.
    The regrouping, the floor and the log share one new buffer: on a shared CPU, writing
    fresh memory (page faults) costs more than the arithmetic.
    """
    rows, cols = scores.shape
    k_steps = stream_steps(cols, steps)
    width = math.ceil(cols / k_steps)
    floor = score_floor(scores)
    s = scores.detach().float()
    if width * k_steps != cols:
        s = torch.nn.functional.pad(s, (0, width * k_steps - cols))
    blocks = torch.empty(k_steps, rows, width, device=s.device)
    for r in range(0, rows, _ROW_CHUNK):  # (rc, b, K) → (K, rc, b)
        view = s[r : r + _ROW_CHUNK].view(-1, width, k_steps).permute(2, 0, 1)
        torch.clamp_min(view, floor, out=blocks[:, r : r + _ROW_CHUNK])
    blocks.log_()
    widths = [len(range(k, cols, k_steps)) for k in range(k_steps)]
    for k, valid in enumerate(widths):
        blocks[k, :, valid:] = 0.0  # padding: adds nothing to the block sums
    return blocks, widths


def block_moments(blocks: torch.Tensor, widths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (K, rows) of each block's valid entries, in two reductions.

    Zero padding adds nothing to Σu or Σu², so dividing by the valid width is exact.
    """
    count = torch.tensor(widths, dtype=blocks.dtype, device=blocks.device).unsqueeze(1)
    mean = blocks.sum(2) / count  # (K, rows)
    mean_sq = torch.linalg.vector_norm(blocks, dim=2).pow(2) / count
    return mean, (mean_sq - mean.pow(2)).clamp_min(0.0)


def _sweep(
    blocks: torch.Tensor,
    widths: list[int],
    means: torch.Tensor,
    variances: torch.Tensor,
    sparsity: float,
    state: EwmaState,
    decay: float,
    *,
    drops: torch.Tensor,
    decide: bool = False,
) -> None:
    """One pass over the K blocks (K, rows, b), writing each step's decisions into ``drops``.

    A learning sweep aims every block at the plain share ``sparsity`` (its ``drops`` are
    overwritten later); the deciding sweep aims each block at the share that the row's
    remaining budget calls for.
    """
    rows, cols = blocks.shape[1], sum(widths)
    pruned = torch.zeros(rows, device=blocks.device)  # (rows,) weights pruned so far
    seen = 0
    for k, width in enumerate(widths):
        state.update(means[k], variances[k], decay)
        if decide:
            p = (sparsity * cols - pruned) / (cols - seen)
        else:
            p = torch.full((rows,), sparsity, device=blocks.device)
        tau = state.threshold(p)  # (rows,)
        torch.lt(blocks[k], tau.unsqueeze(1), out=drops[k])  # (rows, b)
        dropped = drops[k, :, :width].sum(1, dtype=torch.int32)  # int32: ~4× faster on bools
        state.correct(p, dropped, width, decay)
        pruned += dropped
        seen += width


def nm_count_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Exact N:M keep-mask (rows, in) without a sort: keep an entry if < N in its group beat it.

    An entry's rank in its group of M is the number of group members with a higher score
    (ties: the earlier position wins), counted with M vectorised comparisons: O(M) work per
    weight, i.e. linear for a fixed pattern such as 2:4 (arXiv 2501.16376's structured mode).
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.detach().float().reshape(rows, cols // m, m)  # (out, in/M, M)
    position = torch.arange(m, device=scores.device)  # (M,)
    rank = torch.zeros(groups.shape, dtype=torch.int32, device=scores.device)
    for k in range(m):
        other = groups[..., k : k + 1]  # (out, in/M, 1): member k against every member
        beats = (other > groups) | ((other == groups) & (k < position))
        rank += beats.to(torch.int32)
    return (rank < n).reshape(rows, cols)
