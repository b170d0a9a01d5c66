"""``hqq``: Half-Quadratic Quantization, calibration-free (Badri & Shaji, Mobius Labs, 2023).

HQQ ("Half-Quadratic Quantization of Large Machine Learning Models", blog post,
mobiusml.github.io/hqq_blog) fits the quantization parameters of each group to the weight
alone, with no data, by minimising a sparsity-promoting l_p error (p < 1), which tolerates a
few large errors on outliers in exchange for a tight fit of the bulk:

    min_z  ‖W − Q⁻¹_z(Q_z(W))‖_p^p,      Q_z(W) = clamp(round(W/s + z)),  Q⁻¹_z(q) = (q − z)·s.

Half-quadratic splitting introduces the error W_e and alternates two closed-form steps, with
the penalty β growing by κ each iteration:

1. W_e ← shrink_p(W − Q⁻¹_z(Q_z(W)), β), the generalised soft-thresholding operator
   ``sign(x)·relu(|x| − |x|^(p−1)/β)`` (the l_p proximal step);
2. z ← mean_group(Q_z(W) − (W − W_e)/s), the least-squares zero point given W_e.

**Integer zero points.** HQQ's zero point is a float; slimline's :class:`QuantLinear` stores
one uint8 zero point per group, which keeps 0 on the grid (pruned weights stay exactly zero)
and lets the layer reuse packing, kernels and checkpoints unchanged. We reconcile the two
honestly in two phases: phase 1 is HQQ as published (float z, scale fixed at the min/max
grid); its zero point is then rounded to the nearest integer, and phase 2 runs the same
half-quadratic loop with z fixed and the *scale* updated in closed form instead
(s ← Σ c·(W − W_e) / Σ c², c = q − z), which absorbs most of the lost fractional offset.
Every group keeps its best iterate by the l_p objective, the min/max (RTN) grid included, so
the objective is not worse than RTN's (up to the float16 rounding of the stored scale). This
is a variant of HQQ adapted to integer zero points, not the reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import linear_weight
from slimline.quantize.mixed_sensitivity import Quantizer
from slimline.quantize.packing import (
    QuantizedWeight,
    compact_scale_dtype,
    effective_group,
    from_groups,
    quantize_groups,
    to_groups,
)
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.rtn import choose_widths, width_note
from slimline.quantize.weight_only import MixedWidthConfig
from slimline.search.ranges import Choice, SearchSpace


@dataclass(frozen=True, kw_only=True)
class HqqConfig(MixedWidthConfig):
    """HQQ: ``rtn``'s asymmetric grid and packing, zero point and scale fitted by HQQ."""

    method: ClassVar[str] = "hqq"
    needs_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = "half-quadratic (l_p, p<1) fit of zero points/scales, int2–int8"
    paper: ClassVar[str] = "HQQ, Badri & Shaji 2023 (Mobius Labs blog)"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {
        "bits": Choice(3, 4, 8),
        "group_size": Choice(32, 64, 128),
    }

    # HQQ optimises the zero point, so only the asymmetric grid has one to optimise.
    symmetric: bool = False
    # Iterations per phase; the reference uses 20 and converges in fewer.
    iterations: int = 20
    # p < 1 makes the error sparse: outliers may be clipped if the bulk fits better.
    lp_norm: float = 0.7
    # Initial half-quadratic penalty β and its growth κ per iteration (reference values).
    beta: float = 10.0
    kappa: float = 1.01

    def check(self) -> None:
        super().check()
        if self.symmetric:
            self.fail("symmetric", "HQQ optimises the zero point: use symmetric=false")
        if self.iterations < 0:
            self.fail("iterations", f"must be ≥ 0, got {self.iterations}")
        if not 0.0 < self.lp_norm < 1.0:
            self.fail("lp_norm", f"must be in (0, 1), got {self.lp_norm}")
        if not self.beta > 0.0:
            self.fail("beta", f"must be > 0, got {self.beta}")
        if not self.kappa >= 1.0:
            self.fail("kappa", f"must be ≥ 1, got {self.kappa}")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal operator of ‖·‖_p^p / β (elementwise)."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp_min(1e-12).pow(p - 1.0) / beta)


def lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float, valid: torch.Tensor) -> torch.Tensor:
    """(N, G, g) weights -> (N, G) per-group ``Σ |w − ŵ|^p`` over the valid entries."""
    return ((w - w_hat).abs().pow(p) * valid).sum(dim=-1)


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, levels: int) -> torch.Tensor:
    """(N, G, g) codes ``clamp(round(w/s + z), 0, levels)`` with (N, G, 1) s and z."""
    return torch.clamp(torch.round(w / s + z), 0, levels)


def _half_quadratic(
    w: torch.Tensor,
    valid: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    cfg: HqqConfig,
    *,
    update: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the HQQ loop updating ``"zero"`` (phase 1) or ``"scale"`` (phase 2).

    ``w`` (N, G, g), ``s`` and ``z`` (N, G, 1). Returns the best (s, z) per group by the l_p
    objective, the starting point included.
    """
    levels = 2**cfg.bits - 1
    count = valid.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (1, G, 1)
    q = _codes(w, s, z, levels)
    best = lp_error(w, (q - z) * s, cfg.lp_norm, valid)  # (N, G)
    best_s, best_z = s.clone(), z.clone()
    beta = cfg.beta
    for _ in range(cfg.iterations):
        w_e = shrink_lp(w - (q - z) * s, beta, cfg.lp_norm)  # (N, G, g)
        target = (w - w_e) * valid
        if update == "zero":
            z = ((q - target / s) * valid).sum(dim=-1, keepdim=True) / count
        else:
            c = (q - z) * valid
            num, den = (c * target).sum(-1, keepdim=True), (c * c).sum(-1, keepdim=True)
            fitted = num / den.clamp_min(1e-12)
            s = torch.where((den > 0) & (fitted > 0) & fitted.isfinite(), fitted, s)
        beta *= cfg.kappa
        q = _codes(w, s, z, levels)
        err = lp_error(w, (q - z) * s, cfg.lp_norm, valid)
        better = (err < best).unsqueeze(-1)  # (N, G, 1)
        best = torch.minimum(err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _better_zero(
    w: torch.Tensor,
    valid: torch.Tensor,
    s: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    cfg: HqqConfig,
) -> torch.Tensor:
    """(N, G, 1) per group the zero point of lower l_p error (rounding may lose to RTN's)."""
    levels = 2**cfg.bits - 1
    err_a = lp_error(w, (_codes(w, s, z_a, levels) - z_a) * s, cfg.lp_norm, valid)
    err_b = lp_error(w, (_codes(w, s, z_b, levels) - z_b) * s, cfg.lp_norm, valid)
    return torch.where((err_b < err_a).unsqueeze(-1), z_b, z_a)


def hqq_quantize_weight(weight: torch.Tensor, cfg: HqqConfig) -> QuantizedWeight:
    """HQQ-quantize ``weight`` (N, K): uint8 codes (N, K), scales (N, G), uint8 zeros (N, G).

    Codes, scales and zeros follow the asymmetric grid of :mod:`slimline.quantize.packing`
    (``w ≈ (q − z)·s``), so :meth:`QuantLinear.from_codes` stores them as ``rtn`` would.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    levels = 2**cfg.bits - 1
    w32 = weight.detach().float()
    _, s0, z0 = quantize_groups(w32, cfg.bits, cfg.group_size, symmetric=False)  # min/max
    if z0 is None:  # asymmetric always has zero points; keeps mypy and readers sure
        raise RuntimeError("asymmetric quantize_groups returned no zero points")
    group = effective_group(k, cfg.group_size)
    w = to_groups(w32, group)  # (N, G, g), zero-padded
    valid = to_groups(w32.new_ones(1, k), group)  # (1, G, g): 1 on real columns, 0 on padding
    s, z = s0.float().unsqueeze(-1), z0.float().unsqueeze(-1)  # (N, G, 1)
    s, z_float = _half_quadratic(w, valid, s, z, cfg, update="zero")  # phase 1: HQQ proper
    z = _better_zero(w, valid, s, z, torch.clamp(torch.round(z_float), 0, levels), cfg)
    s, z = _half_quadratic(w, valid, s, z, cfg, update="scale")  # phase 2: refit the scale
    scales = s.squeeze(-1)
    stored = scales.to(compact_scale_dtype(scales))  # (N, G)
    q = _codes(w, stored.float().unsqueeze(-1), z, levels)  # codes for the scale as stored
    q = from_groups(q, k).to(torch.uint8).contiguous()
    return QuantizedWeight(q, stored, z.squeeze(-1).to(torch.uint8))


def quantize_module(module: nn.Module, cfg: HqqConfig) -> QuantLinear:
    """The HQQ-quantized replacement of one Linear-like layer."""
    weight = linear_weight(module).detach()  # (N, K)
    q, scales, zeros = hqq_quantize_weight(weight, cfg)
    layer = QuantLinear.from_codes(
        q, scales, zeros, bias=getattr(module, "bias", None), bits=cfg.bits,
        group_size=cfg.group_size, symmetric=False, decode_activations=cfg.decode_activations,
    )  # fmt: skip
    return layer.to(weight.device)


def hqq_quantizer(cfg: HqqConfig) -> Quantizer:
    """``(weight, bits) -> (codes, scales, zeros)`` as HQQ fits them at ``bits``."""
    return lambda w, bits, _hessian: hqq_quantize_weight(w, cfg.with_bits(bits))


@register(HqqConfig)
def apply_hqq(model: nn.Module, cfg: HqqConfig, ctx: StepContext) -> StepOutcome:
    """Replace every selected Linear/Conv1D layer of ``model`` by an HQQ :class:`QuantLinear`.

    With ``average_bits``, widths come from each layer's HQQ error at every width in
    ``bit_choices``: ``‖ΔW‖²``, or with calibration data the output cost of
    :mod:`slimline.quantize.mixed` (then HQQ stays data-free; only the widths use the data).
    """
    layers = dict(cfg.select_modules(model))
    plan = choose_widths(model, layers, cfg, hqq_quantizer(cfg), ctx.calibration, ctx.progress)
    for name, module in layers.items():
        bits = cfg.bits if plan is None else plan.widths[name]
        model.set_submodule(name, quantize_module(module, cfg.with_bits(bits)))
    fit = f"asymmetric; HQQ l_{cfg.lp_norm} fit, {cfg.iterations} iterations per phase, "
    note = width_note(model, list(layers), cfg, plan, fit + "integer zero points")
    return StepOutcome(modules=list(layers), notes=[note])
