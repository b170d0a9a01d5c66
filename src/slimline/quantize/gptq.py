"""``gptq``: weight quantization with second-order error compensation (arXiv 2210.17323).

Columns of a layer's (N, K) weight are quantized left to right; each column's rounding error
is spread over the columns not yet quantized through the inverse Hessian H⁻¹ of the
layer-wise least-squares problem (H = 2/n · X Xᵀ from calibration inputs), so the layer's
output on those inputs moves as little as possible. As in the paper's Algorithm 1:

* the upper Cholesky factor of H⁻¹ replaces the repeated inverse updates (§4, step 3);
* the sweep itself is :func:`slimline.core.obs.obs_sweep`, shared with SparseGPT;
* updates are applied lazily, ``block_size`` columns at a time (§4, step 2) — the same
  result as the column-by-column form, with far fewer memory passes;
* dampening λ = ``dampening`` · mean(diag H) keeps H positive definite;
* ``act_order`` quantizes columns by decreasing diag(H) (the paper's "act-order"
  heuristic); groups then stay the contiguous groups of the original order, with their
  scales fixed up front from the unquantized weight ("static groups"), so the packed layout
  is the one ``rtn`` uses;
* without ``act_order``, a group's scale is chosen when its first column is reached, on the
  already error-updated weights, as in the reference.

Layers are processed block by block on calibration inputs that went through the already
quantized blocks, so peak memory stays near one block plus the model.

With ``average_bits`` (mixed precision, :mod:`slimline.quantize.mixed`), passes over the
unquantized model measure each layer's sensitivity at every width from the error ΔW of GPTQ
itself under the layer's input Hessian there (one solve per width; on code-llama-tiny at 3.5
bits this beat round-to-nearest's ΔW as the proxy, +0.08% perplexity against +0.19%), and
choose the widths; the sequential GPTQ pass then quantizes each layer at its own width, on
inputs from the already quantized blocks as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimline.core.calibration import sequential_layers
from slimline.core.obs import masked_problem, obs_sweep
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import InputStats, inverse_hessian_factor
from slimline.core.targets import linear_weight
from slimline.quantize.mixed_sensitivity import Quantizer
from slimline.quantize.packing import (
    QuantizedWeight,
    effective_group,
    num_groups,
    quantize_groups,
)
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.rtn import choose_widths, width_note
from slimline.quantize.weight_only import MixedWidthConfig
from slimline.search.ranges import Choice, SearchSpace


@dataclass(frozen=True, kw_only=True)
class GptqConfig(MixedWidthConfig):
    """GPTQ: ``rtn``'s grid and packing, with Hessian-based error compensation."""

    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    summary: ClassVar[str] = "second-order (OBQ/GPTQ) weight quantization, int2–int8, packed"
    paper: ClassVar[str] = "GPTQ, arXiv 2210.17323"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {
        "bits": Choice(3, 4, 8),
        "group_size": Choice(32, 64, 128, None),
    }

    # Lazy batch updates of 128 columns: the paper's B; any value gives the same result.
    block_size: int = 128
    # λ = 1% of the mean diagonal (the reference default) keeps H invertible.
    dampening: float = 0.01
    # Quantize large-activation columns first: on minilm at 3 bits g128 it lifts cosine from
    # 0.84 to 0.88 (symmetric) and 0.93 (asymmetric); with static groups it costs nothing at
    # inference, so it is on by default (AutoGPTQ's desc_act).
    act_order: bool = True

    def check(self) -> None:
        super().check()
        if self.block_size < 1:
            self.fail("block_size", f"must be ≥ 1, got {self.block_size}")
        if not 0.0 < self.dampening < 1.0:
            self.fail("dampening", f"{self.dampening} is outside (0, 1)")


def quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column (N,) on the grid of ``packing``."""
    s = scale.float()
    if zero is None:
        half = 2 ** (bits - 1)
        q = torch.clamp(torch.round(w / s), -half, half - 1)
        return q, q * s
    z = zero.float()
    q = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    return q, (q - z) * s


def gptq_quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: GptqConfig
) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` (N, K) given H (K, K): codes, scales, zero points."""
    if cfg.act_order:  # by decreasing diag H (1 where an input was never active)
        diag = torch.diag(hessian).float()
        perm = torch.argsort(torch.where(diag == 0, 1.0, diag), descending=True)
    else:
        perm = torch.arange(weight.shape[1])
    w, h = masked_problem(weight, hessian, perm)
    del hessian  # freed here when the caller handed its only reference over
    grids = _GroupGrids(w, cfg)
    if cfg.act_order:  # static groups: fixed from the unquantized weight, original order
        grids.fix_all(w[:, torch.argsort(perm)])
    hinv = inverse_hessian_factor(h, cfg.dampening, overwrite=True)  # h is this call's copy
    del h
    codes = torch.zeros(w.shape[1], w.shape[0])  # (K, N): one contiguous row a column

    def decide(j: int, w_now: torch.Tensor) -> torch.Tensor:
        col = int(perm[j])  # the column's index in the original order
        if not cfg.act_order and col % grids.group == 0:
            # The group's grid, chosen on the weights as updated so far (columns past this
            # block lack its lazy update, as in the reference).
            grids.fix(col // grids.group, w_now[:, col:col + grids.group])
        q, deq = quantize_column(w_now[:, j], *grids.of(col), cfg.bits)
        codes[j] = q
        return deq

    obs_sweep(w, hinv, cfg.block_size, decide)
    code_dtype = torch.int8 if cfg.symmetric else torch.uint8
    return grids.stored(codes.t()[:, torch.argsort(perm)].to(code_dtype))


class _GroupGrids:
    """Per-group scales (N, G) and zero points of GPTQ, fixed up front or as groups are reached."""

    def __init__(self, w: torch.Tensor, cfg: GptqConfig) -> None:
        n, k = w.shape
        self.cfg = cfg
        self.group = effective_group(k, cfg.group_size)
        self.scales = torch.zeros(n, num_groups(k, cfg.group_size))
        self.zeros = None if cfg.symmetric else torch.zeros(n, self.scales.shape[1])
        self.dtypes: set[torch.dtype] = set()

    def fix_all(self, w: torch.Tensor) -> None:
        """Every group's grid from ``w`` (N, K) in the original column order."""
        _, s, z = quantize_groups(w, self.cfg.bits, self.cfg.group_size, self.cfg.symmetric)
        self.dtypes.add(s.dtype)
        self.scales.copy_(s.float())
        if self.zeros is not None and z is not None:
            self.zeros.copy_(z.float())

    def fix(self, g: int, columns: torch.Tensor) -> None:
        """Group ``g``'s grid from its ``columns`` (N, group)."""
        _, s, z = quantize_groups(columns, self.cfg.bits, None, self.cfg.symmetric)
        self.dtypes.add(s.dtype)
        self.scales[:, g] = s[:, 0].float()
        if self.zeros is not None and z is not None:
            self.zeros[:, g] = z[:, 0].float()

    def of(self, col: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point (or None) of the group of original column ``col``."""
        g = col // self.group
        return self.scales[:, g], self.zeros[:, g] if self.zeros is not None else None

    def stored(self, codes: torch.Tensor) -> QuantizedWeight:
        """``codes`` with the grids as stored: fp16 scales when every group's chosen scale was
        fp16 (codes were computed with those), uint8 zero points."""
        dtype = torch.float16 if self.dtypes == {torch.float16} else torch.float32
        zeros = self.zeros.to(torch.uint8) if self.zeros is not None else None
        return QuantizedWeight(codes, self.scales.to(dtype), zeros)


def gptq_quantizer(cfg: GptqConfig) -> Quantizer:
    """``(weight, bits, A) -> (codes, scales, zeros)``: GPTQ under the input Hessian A."""

    def quantize(weight: torch.Tensor, bits: int, hessian: torch.Tensor | None) -> QuantizedWeight:
        if hessian is None:  # only without calibration data, which gptq refuses
            return QuantizedWeight(*quantize_groups(weight, bits, cfg.group_size, cfg.symmetric))
        return gptq_quantize_weight(weight, hessian, cfg.with_bits(bits))

    return quantize


@register(GptqConfig)
def apply_gptq(model: nn.Module, cfg: GptqConfig, ctx: StepContext) -> StepOutcome:
    if not ctx.calibration:
        raise ValueError("gptq needs calibration data")
    chosen = dict(cfg.select_modules(model))
    plan = choose_widths(model, chosen, cfg, gptq_quantizer(cfg), ctx.calibration, ctx.progress)
    names = list(chosen)
    del chosen  # names only from here: each float layer is freed once it is replaced

    def make(_name: str, module: nn.Module) -> InputStats:
        return InputStats(linear_weight(module).shape[1], hessian=True)

    def update(group: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
        for name, module in group.items():
            own = cfg.with_bits(cfg.bits if plan is None else plan.widths[name])
            # A layer's statistics are freed once it is quantized; layers reading one input
            # share them, and the last of those takes H over without a copy.
            acc = stats.pop(name)
            shared = any(acc is other for other in stats.values())
            # H is handed straight in, with no name here: the call holds its only reference
            # and drops it once it has its own permuted copy.
            qw = gptq_quantize_weight(
                linear_weight(module), acc.hessian if shared else acc.take_hessian(), own
            )
            del acc
            layer = QuantLinear.from_codes(
                qw.q, qw.scales, qw.zeros, bias=getattr(module, "bias", None), bits=own.bits,
                group_size=cfg.group_size, symmetric=cfg.symmetric,
                decode_activations=cfg.decode_activations,
            )
            model.set_submodule(name, layer)

    sequential_layers(model, names, ctx.calibration, make, update, progress=ctx.progress,
                      desc="gptq", share_inputs=True)
    order = "act-order" if cfg.act_order else "in order"
    note = width_note(model, names, cfg, plan, order)
    return StepOutcome(modules=names, notes=[note])
