"""``swiftprune``: Hessian-free pruning with a streaming EWMA threshold (arXiv 2501.16376).

SwiftPrune (v1 title: HWPQ, "Hessian-free Weight Pruning-Quantization") keeps the layer-wise
view of OBS/SparseGPT (arXiv 2301.00774). The cost of removing weight w_ij from a linear
layer with inputs X is its effect on the output. The method makes two changes:

1. **Contribution metric, no Hessian inverse.** OBS ranks a weight by w²/[H⁻¹]_jj with
   H = 2/n·X Xᵀ. That needs the (in × in) Hessian and its inverse: O(in³) time and O(in²)
   memory. SwiftPrune scores a weight by its contribution to the output, computed from the
   weight and the sum of its input's squares. Here that is L_ij = w_ij² · H_jj, with
   H_jj = 2/n · Σ_t x_tj² (:func:`swiftprune_scores`). It equals the OBS saliency exactly
   when H is diagonal (uncorrelated input features), because then [H⁻¹]_jj = 1/H_jj. In
   general 1/H_jj ≤ [H⁻¹]_jj, so the score is the diagonal approximation of OBS.
   Choice/caveat: the method section of the paper could not be retrieved. The formula
   comes from the paper's abstract and summaries ("a contribution metric from the weight's
   value and the sum of squared input values") and from that OBS limit. Within a row it
   ranks weights exactly as Wanda's |w|·‖x‖ does (arXiv 2306.11695), so against Wanda
   SwiftPrune differs in how it selects, not in what it ranks by. Like Wanda, it does not
   update the surviving weights.
2. **Selection without a sort.** Each row's threshold is a streaming EWMA estimate, linear
   in the row's length (``ewma.ewma_threshold_mask``). The count is close to, not
   exactly, the asked one; the ewma module documents how close. N:M (2:4) masks are exact
   and also need no sort (``ewma.nm_count_mask``).

**Joint pruning-quantization** (the paper's HWPQ part). With ``fp8=True``, the surviving
weights are rounded in the same pass to ``torch.float8_e4m3fn``, with a scale taken over
the survivors, and dequantized back into the float weight, so the model runs everywhere.
Choices, because the retrievable text does not say:

* The scale is per output row by default (``fp8_scale="row"``): the same grouping as the
  selection and as common fp8 weight formats; ``"tensor"`` gives one scale per layer.
* The scale is a power of two (≥ absmax/448). Since e4m3 is a floating-point format, this
  costs next to no precision: only the subnormal range moves, by at most one binade. The
  product code × scale is then exact in fp32 and bf16 (and in fp16 unless it underflows),
  so the dequantized weights stay exactly on the fp8 grid whatever the model's dtype.

Storage as true fp8 (one byte per weight plus scales) belongs to the ``fp8`` quantizer
(another issue). A checkpoint written by ``sl.save`` after this step holds the float
weights in the model's dtype: zeros where pruned, and survivors that are exactly an e4m3
code times a power-of-two row scale. No fp8 bytes or scales are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import InputStats
from slimline.prune.base import UnstructuredPruneConfig, prune_layerwise
from slimline.prune.ewma import ewma_threshold_mask, nm_count_mask
from slimline.prune.masks import parse_pattern
from slimline.search.ranges import FloatRange, SearchSpace

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

Fp8Scale = Literal["row", "tensor"]


@dataclass(frozen=True, kw_only=True)
class SwiftPruneConfig(UnstructuredPruneConfig):
    """SwiftPrune: prune by w²·H_jj per row with an EWMA threshold; optional fp8 survivors."""

    method: ClassVar[str] = "swiftprune"
    family: ClassVar[Family] = Family.PRUNE
    needs_calibration: ClassVar[bool] = True  # the metric needs Σ x² of each input feature
    summary: ClassVar[str] = (
        "Wanda's |w|·‖x‖ ranking, selected per row by a linear-time streaming-EWMA threshold "
        "instead of a sort (approximate count; 2:4 identical to wanda); optional fp8 survivors"
    )
    paper: ClassVar[str] = (
        "after SwiftPrune / HWPQ, arXiv 2501.16376 (its own metric could not be read); "
        "ranking of Wanda, arXiv 2306.11695"
    )
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"sparsity": FloatRange(0.1, 0.7, step=0.05)}

    # β of the threshold's EWMAs, per step (one block of columns, see `ewma_steps`). 0.9
    # remembers ~10 steps: enough to average out a block's noise, short enough to follow drift.
    ewma_decay: float = 0.9
    # EWMA steps per row, each over ⌈in/steps⌉ columns (≥ 8). Fewer, wider steps see more
    # values each and launch fewer kernels; 16 beat 32 and 64 on 256–4096-wide rows.
    ewma_steps: int = 16
    # Joint pruning-quantization: survivors rounded to float8_e4m3fn, kept dequantized.
    fp8: bool = False
    # fp8 scale granularity: one power-of-two scale per output row, or per layer.
    fp8_scale: Fp8Scale = "row"

    def check(self) -> None:
        super().check()
        if not 0.0 < self.ewma_decay < 1.0:
            self.fail("ewma_decay", f"{self.ewma_decay} is outside (0, 1)")
        if self.ewma_steps < 1:
            self.fail("ewma_steps", f"must be ≥ 1, got {self.ewma_steps}")


def swiftprune_scores(weight: torch.Tensor, sq_norm: torch.Tensor, tokens: int) -> torch.Tensor:
    """Contribution metric L_ij = w_ij² · H_jj, H_jj = 2/n · Σ_t x_tj² (out, in).

    ``weight`` (out, in); ``sq_norm`` (in,) Σ_t x_tj² over the ``tokens`` calibration tokens
    (``InputStats.sq_norm``). Equal to OBS's w²/[H⁻¹]_jj when H = 2/n·XXᵀ is diagonal.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be ≥ 1, got {tokens}")
    h_diag = sq_norm.to(torch.float32) * (2.0 / tokens)  # (in,)
    return torch.square(weight.detach().float()).mul_(h_diag.unsqueeze(0))


def swiftprune_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: str | None = None,
    *,
    decay: float = 0.9,
    steps: int = 16,
) -> torch.Tensor:
    """Keep-mask (out, in): exact N:M if ``pattern``, else the per-row EWMA threshold."""
    if pattern is not None:
        return nm_count_mask(scores, *parse_pattern(pattern))
    return ewma_threshold_mask(scores, sparsity, decay=decay, steps=steps)


def fp8_scales(weight: torch.Tensor, granularity: Fp8Scale = "row") -> torch.Tensor:
    """Power-of-two scales s ≥ absmax/448, (out, 1) per row or (1, 1) per tensor; 1 if all zero.

    w/s then lies in [-448, 448], e4m3's range; s = 2^⌈log2(absmax/448)⌉, so
    absmax/s ∈ (224, 448].
    """
    w = weight.detach().float().abs()
    absmax = w.amax(dim=1, keepdim=True) if granularity == "row" else w.amax().reshape(1, 1)
    mantissa, exponent = torch.frexp(absmax / FP8_MAX)  # ratio = mantissa·2^e, mantissa ∈ [½, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact powers of two
    scale = torch.ldexp(torch.ones_like(absmax), exponent)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def fp8_round_trip(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to e4m3 with ``scale`` (broadcast to ``weight``) and dequantize, float32.

    Zeros stay zero, so a mask survives. A survivor under half the smallest e4m3 subnormal
    (2⁻¹⁰ · scale: a few millionths of the absmax) would underflow to zero.
    """
    codes = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # (out, in) e4m3
    return codes.float() * scale


def swiftprune_prune_weight(
    weight: torch.Tensor,
    stats: InputStats,
    *,
    sparsity: float,
    pattern: str | None = None,
    fp8: bool = False,
    fp8_scale: Fp8Scale = "row",
    decay: float = 0.9,
    steps: int = 16,
) -> torch.Tensor:
    """Pruned (and, with ``fp8``, fp8-rounded) copy of ``weight`` (out, in), same dtype.

    One pass: scores from the input statistics, the sort-free mask, then the fp8 rounding
    of the survivors with scales over the survivors only. The survivors are not updated.
    """
    scores = swiftprune_scores(weight, stats.sq_norm, stats.tokens)  # (out, in)
    keep = swiftprune_mask(scores, sparsity, pattern, decay=decay, steps=steps)
    # The scores' buffer is reused for the result: fresh memory is the costly part on CPU.
    pruned = torch.mul(weight.detach().float(), keep, out=scores)
    if fp8:
        pruned = fp8_round_trip(pruned, fp8_scales(pruned, fp8_scale))
    return pruned.to(weight.dtype)


@register(SwiftPruneConfig)
def apply_swiftprune(model: nn.Module, cfg: SwiftPruneConfig, ctx: StepContext) -> StepOutcome:
    def prune(weight: torch.Tensor, stats: InputStats, sparsity: float) -> torch.Tensor:
        return swiftprune_prune_weight(
            weight, stats, sparsity=sparsity, pattern=cfg.pattern, fp8=cfg.fp8,
            fp8_scale=cfg.fp8_scale, decay=cfg.ewma_decay, steps=cfg.ewma_steps,
        )

    outcome = prune_layerwise(model, cfg, ctx, prune, hessian=False)
    if cfg.fp8:
        outcome.notes.append(
            f"survivors rounded to float8_e4m3fn (power-of-two {cfg.fp8_scale} scales) and "
            "stored dequantized; true fp8 storage is the fp8 quantizer's job"
        )
    return outcome
