"""``smoothquant``: W8A8 after migrating activation outliers into the weights (arXiv 2211.10438).

A few input channels of a transformer's linears carry activations 10–100× larger than the
rest, so one int8 scale per token (or per tensor) wastes most of its levels on them, while
weights are flat and easy to quantize. SmoothQuant divides each input channel ``j`` by

    s_j = max|X_j|^α / max|W_j|^(1-α)

and multiplies the weight's column ``j`` by it — the same product, with the difficulty shared
between the two according to ``α`` (0.5 in the paper for most models). Both sides then go to
int8: weights per output channel, activations per token at run time (``activations:
"dynamic"``) or per tensor with a scale and zero point calibrated here (``"static"``, the
paper's O3, fastest). ``alpha: null`` searches ``α`` per layer on the calibration inputs,
keeping the value with the least error of the layer's simulated int8 output (the paper
tunes one ``α`` per model; per layer costs nothing at run time). A static grid's range is
chosen the same way among fractions of the calibrated min/max, since a few extreme tokens
would otherwise set the step for all.

``min_cosine`` (static only) mixes the two: the layers whose static grids cost the model's
output most take per-token dynamic activations instead, the fewest that bring the mean cosine
of the model's output to the unquantized model's up to the target, on the last quarter of the
calibration data, held out of the range fitting
(:mod:`slimline.quantize.fallback`; on a BERT encoder these are mostly the feed-forward down
projections, whose post-GELU inputs have the longest tails).

Layers are calibrated block by block (:func:`~slimline.core.calibration.sequential_layers`):
a block's ranges are measured on inputs that went through the already quantized blocks, so a
static grid covers what the quantized model will really feed it. The GEMMs run on oneDNN's
u8·s8 kernel (``torch._int_mm`` where oneDNN is missing), with 7-bit activation grids on CPUs
without VNNI, whose kernel would saturate on 8-bit ones (as ``int8_dynamic``); see
:class:`~slimline.quantize.w8a8.SmoothQuantLinear` for where the ``1/s`` goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.core.calibration import sequential_layers
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import TokenSample
from slimline.core.targets import linear_weight
from slimline.quantize import fallback
from slimline.quantize import kernels_int8 as kernels
from slimline.quantize.packing import quantize_per_channel_int8
from slimline.quantize.w8a8 import SmoothQuantLinear
from slimline.search.ranges import FloatRange, SearchSpace

ACTIVATION_MODES = ("dynamic", "static")
# α searched on this grid when ``alpha`` is null (the paper reports 0.4–0.9 as useful).
ALPHA_GRID = tuple(i / 10 for i in range(11))
# Fractions of the calibrated range tried for a static grid (min/max is 1.0).
CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
# Input rows kept per layer for the α search: a sample, not the activations.
_SEARCH_ROWS = 1024
_TINY = 1e-8
# Layers a note names when min_cosine switches some to dynamic activations.
_NAMED = 6


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(MethodConfig):
    """SmoothQuant W8A8: int8 weights and activations after outlier smoothing."""

    method: ClassVar[str] = "smoothquant"
    family: ClassVar[Family] = Family.QUANTIZE
    needs_calibration: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    summary: ClassVar[str] = "W8A8 after migrating activation outliers into weights, int8 GEMM"
    paper: ClassVar[str] = "SmoothQuant, arXiv 2211.10438"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"alpha": FloatRange(0.3, 0.8, step=0.1)}

    # Migration strength: 0 leaves activations as they are, 1 moves all their range into the
    # weights. null: chosen per layer from ALPHA_GRID on the calibration inputs.
    alpha: float | None = 0.5
    # "dynamic": a scale and zero point per token, computed at run time (robust to any input);
    # "static": one per tensor, calibrated (no run-time reduction; saturates out-of-range).
    activations: str = "dynamic"
    # With static activations: the fewest layers, most sensitive first, switch to per-token
    # dynamic activations for the model's output on a held-out quarter of the calibration
    # data to reach this mean cosine to the unquantized model's (null: every layer static).
    min_cosine: float | None = None

    def check(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            self.fail("alpha", f"must be in [0, 1] or null (searched), got {self.alpha}")
        if self.activations not in ACTIVATION_MODES:
            self.fail("activations", f"must be one of {ACTIVATION_MODES}, got {self.activations!r}")
        if self.min_cosine is not None:
            if self.activations != "static":
                self.fail("min_cosine", "applies to activations: static only (dynamic layers "
                          "have nothing to fall back to)")
            if not 0.0 < self.min_cosine <= 1.0:
                self.fail("min_cosine", f"must be in (0, 1] or null, got {self.min_cosine}")


# --- the maths ----------------------------------------------------------------------------


def smoothing_multiplier(
    x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(K,) ``1 / s`` with ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (the paper's Eq. 4).

    Channels never active or with an all-zero weight column keep ``s_j = 1``.
    """
    x = x_absmax.detach().float()
    w = w_absmax.detach().float()
    live = (x > _TINY) & (w > _TINY)
    s = x.clamp(min=_TINY).pow(alpha) / w.clamp(min=_TINY).pow(1.0 - alpha)
    s = torch.where(live, s.clamp(min=1e-5), torch.ones_like(s))
    return s.reciprocal()


def static_input_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """(scale, zero point) of a ``bits``-wide unsigned grid covering ``[min(lo, 0), max(hi, 0)]``,
    with 0 exact (``bits=7`` where the CPU's int8 GEMM saturates: ``kernels.activation_bits``)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    top = 2**bits - 1
    scale = max((hi - lo) / top, 1e-12)
    zero = int(min(max(round(-lo / scale), 0), top))
    return scale, zero


def smoothed_range(
    lo: torch.Tensor, hi: torch.Tensor, multiplier: torch.Tensor
) -> tuple[float, float]:
    """The tensor-wide range of ``x · m`` from per-channel minima and maxima (``m > 0``)."""
    return float((lo * multiplier).min()), float((hi * multiplier).max())


def simulated_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    multiplier: torch.Tensor,
    input_qparams: tuple[float, int] | None,
    bits: int = 8,
) -> torch.Tensor:
    """``x · Wᵀ`` as the int8 layer computes it, in float (no bias): the search objective.

    ``bits`` is the activation grid's width, the layer's ``activation_bits``.
    """
    q, w_scale = quantize_per_channel_int8(weight / multiplier)
    w_hat = q.float() * w_scale[:, None]
    xs = x.float() * multiplier
    if input_qparams is None:
        codes, scale, zero = kernels.quantize_per_token(xs, bits)
        x_hat = (codes.float() - zero) * scale
    else:
        x_scale, x_zero = input_qparams
        multiplier_x = torch.full_like(multiplier, 1.0 / x_scale)
        codes = kernels.quantize_static(xs, multiplier_x, x_zero, bits)
        x_hat = (codes.float() - x_zero) * x_scale
    return x_hat @ w_hat.t()


def choose_smoothing(
    sample: torch.Tensor,
    weight: torch.Tensor,
    stats: ActivationStats,
    static: bool,
    alphas: tuple[float, ...] = ALPHA_GRID,
    clips: tuple[float, ...] = (1.0,),
    bits: int = 8,
) -> tuple[float, float]:
    """The (``α``, clip) pair whose int8 layer output on ``sample`` is closest to float's.

    ``clip`` shrinks a static grid's calibrated range (``[c·lo, c·hi]``): saturating a few
    extreme values can buy finer steps for all the others. Dynamic grids are never clipped.
    """
    reference = sample.float() @ weight.float().t()
    w_absmax = weight.abs().amax(dim=0)
    best, best_err = (alphas[0], 1.0), float("inf")
    for alpha in alphas:
        m = smoothing_multiplier(stats.absmax, w_absmax, alpha)
        lo, hi = smoothed_range(stats.lo, stats.hi, m)
        for clip in clips if static else (1.0,):
            qparams = static_input_qparams(clip * lo, clip * hi, bits) if static else None
            out = simulated_output(sample, weight, m, qparams, bits)
            err = float((out - reference).square().sum())
            if err < best_err:
                best, best_err = (alpha, clip), err
    return best


# --- calibration --------------------------------------------------------------------------


class ActivationStats:
    """Per-channel min, max and max|x| of a layer's inputs, and a small sample of rows."""

    def __init__(self, features: int, keep_rows: int = 0, seed: int = 0) -> None:
        self.tokens = 0
        self.lo = torch.full((features,), float("inf"))
        self.hi = torch.full((features,), float("-inf"))
        self.features = features
        # A uniform sample of the stream's tokens, the same however they were batched.
        self._sample = TokenSample(keep_rows, seed=seed) if keep_rows > 0 else None

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def add_batch(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if not torch.isfinite(rows).all():
            raise ValueError("smoothquant: a layer input holds NaN or inf during calibration")
        self.tokens += rows.shape[0]
        self.lo = torch.minimum(self.lo, rows.amin(dim=0))
        self.hi = torch.maximum(self.hi, rows.amax(dim=0))
        if self._sample is not None:
            self._sample.add(rows)

    def sample(self) -> torch.Tensor:
        if self._sample is None or self._sample.seen == 0:
            return torch.empty(0, self.features)
        return self._sample.rows


def smooth_layer(
    module: nn.Module, stats: ActivationStats, cfg: SmoothQuantConfig, static: bool
) -> tuple[SmoothQuantLinear, float]:
    """The SmoothQuant int8 replacement of one layer with ``static`` or per-token dynamic
    activations, and the ``α`` it used."""
    weight = linear_weight(module).detach().float()
    bits = kernels.activation_bits()  # the grid searched is the grid the layer will run
    alpha, clip = cfg.alpha, 1.0
    if alpha is None or static:
        alphas = ALPHA_GRID if alpha is None else (alpha,)
        alpha, clip = choose_smoothing(
            stats.sample(), weight, stats, static, alphas, CLIP_GRID, bits
        )
    m = smoothing_multiplier(stats.absmax, weight.abs().amax(dim=0), alpha)
    if not static:
        return SmoothQuantLinear.from_smoothed(module, m, None, bits), alpha
    lo, hi = smoothed_range(stats.lo, stats.hi, m)
    qparams = static_input_qparams(clip * lo, clip * hi, bits)
    return SmoothQuantLinear.from_smoothed(module, m, qparams, bits), alpha


@register(SmoothQuantConfig)
def apply_smoothquant(model: nn.Module, cfg: SmoothQuantConfig, ctx: StepContext) -> StepOutcome:
    """Calibrate block by block and replace every selected layer by a SmoothQuantLinear."""
    if not ctx.calibration:
        raise ValueError("smoothquant needs calibration data")
    names = [name for name, _ in cfg.select_modules(model)]  # the float layers go as replaced
    static = cfg.activations == "static"
    keep = _SEARCH_ROWS if cfg.alpha is None or static else 0
    alphas: list[float] = []
    # min_cosine: each layer's dynamic form, and the float model's answers to aim at
    dynamic: dict[str, SmoothQuantLinear] = {}
    fit, checks = list(ctx.calibration), list[Batch]()
    if cfg.min_cosine is not None:
        fit, checks = fallback.split_off_checks(fit)
    reference = fallback.model_outputs(model, checks)

    def make(_name: str, module: nn.Module) -> ActivationStats:
        return ActivationStats(linear_weight(module).shape[1], keep_rows=keep)

    def update(group: dict[str, nn.Module], stats: dict[str, ActivationStats]) -> None:
        for name, module in group.items():
            layer, alpha = smooth_layer(module, stats[name], cfg, static)
            if checks:
                dynamic[name] = smooth_layer(module, stats[name], cfg, static=False)[0]
            model.set_submodule(name, layer)
            alphas.append(alpha)

    sequential_layers(model, names, fit, make, update, progress=ctx.progress,
                      desc="smoothquant")
    notes = []
    if cfg.min_cosine is not None:
        switched, reached = fallback.fall_back(
            model, dynamic, lambda: fallback.output_cosine(model, checks, reference),
            cfg.min_cosine)
        miss = "" if reached >= cfg.min_cosine else f", short of min_cosine {cfg.min_cosine}"
        held = (f"{len(checks)} held-out calibration batches" if len(ctx.calibration) > 1
                else "the one calibration batch")
        shown = ", ".join(switched[:_NAMED]) + (", …" if len(switched) > _NAMED else "")
        notes.append(f"{len(switched)} of {len(names)} layers with per-token dynamic activations"
                     f" (cosine {reached:.5f} on {held}{miss}): {shown or 'none'}")
    kernel = kernels.w8a8_kernel_note()
    if cfg.alpha is None and alphas:
        chosen_alpha = f"α searched per layer (median {sorted(alphas)[len(alphas) // 2]:.1f})"
    else:
        chosen_alpha = f"α={cfg.alpha}"
    return StepOutcome(
        modules=names,
        notes=[f"{len(names)} layers to W8A8, {cfg.activations} activations, {chosen_alpha},"
               f" on {kernel}", *notes],
    )
