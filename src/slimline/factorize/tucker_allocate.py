"""Tucker ranks across convolutions under one weight budget (``allocation: sensitivity``).

The matrix methods' question (:mod:`slimline.factorize.allocate`) with Tucker-2 layouts in
place of ranks: each conv offers (r_out, r_in) along the ``ratio`` path (r_in ≈ r_out·C_in/C_out,
Kim et al., arXiv 1511.06530), its uniform choice and the dense kernel, each at its error and
weights, and the same knapsack picks the layouts of least total error within what the uniform
choice spends. A conv computes W_mat (C_out, C_in·kh·kw) times its im2col patches, so its
output error is the K-FAC cost of the matrix methods on those patches:

    e(r) = Σ_o G_oo (ΔW A ΔWᵀ)_oo,   ΔW = W_mat − W'_mat(r),   A = P Pᵀ / n

with P the patches of the conv's calibration inputs (one column per output position) and G
the output channels' gains (``quantize.mixed_sensitivity.output_gains``); without data
A = G = I, ‖ΔW‖²_F.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.calibration import sequential_layers
from slimline.core.registry import StepContext
from slimline.factorize.allocate import LayerOptions, RankPlan, plan_within_budget
from slimline.factorize.base import FactorStats
from slimline.factorize.tucker import TuckerConfig, tucker2, tucker_params
from slimline.quantize.mixed_sensitivity import output_error, output_gains

TuckerRanks = tuple[int, int] | None  # (r_out, r_in); None: the conv stays dense
# Images unfolded at a time: the patches of one chunk are (chunk·positions, C_in·kh·kw).
_CHUNK = 16


class ConvPatchStats:
    """Σ p pᵀ over a Conv2d's im2col patches p (C_in·kh·kw,), float64; one token per output
    position. An accumulator for ``core.calibration``'s capture (``add_batch``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.stats = FactorStats(conv.weight[0].numel(), hessian=True, abs_mean=False)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """``x`` (B, C_in, H, W), the conv's input."""
        conv = self.conv
        if isinstance(conv.padding, str):  # "same" / "valid": tucker selects none of these
            raise TypeError(f"tucker: padding {conv.padding!r} is not supported")
        for chunk in x.detach().split(_CHUNK):
            patches = F.unfold(chunk, conv.kernel_size, dilation=conv.dilation,
                               padding=conv.padding, stride=conv.stride)  # (b, C_in·kh·kw, L)
            self.stats.add_batch(patches.transpose(1, 2))  # (b, L, C_in·kh·kw)
        self.tokens = self.stats.tokens

    @property
    def second_moment(self) -> torch.Tensor:
        """A = P Pᵀ / n (C_in·kh·kw, C_in·kh·kw)."""
        return self.stats.xxt / max(self.tokens, 1)


def candidate_layouts(
    shape: torch.Size | tuple[int, ...], uniform: TuckerRanks, count: int = 32
) -> list[tuple[int, int]]:
    """Up to ``count`` (r_out, r_in) along the ratio path that store fewer weights than the
    kernel, plus the uniform choice (sorted, unique)."""
    c_out, c_in = shape[0], shape[1]
    grid = torch.linspace(1, c_out, min(count, c_out)).round().long().tolist()
    path = {(r, min(c_in, max(1, round(r * c_in / c_out)))) for r in grid}
    saving = {rs for rs in path if tucker_params(shape, *rs) < math.prod(shape)}
    return sorted(saving | ({uniform} if uniform is not None else set()))


def tucker_error(
    weight: torch.Tensor, ranks: tuple[int, int], iterations: int,
    second_moment: torch.Tensor | None, gain: torch.Tensor | None,
) -> float:
    """The output cost of ``weight`` (C_out, C_in, kh, kw) replaced by its Tucker-2 at ``ranks``."""
    u_out, core, u_in = tucker2(weight, *ranks, iterations)
    rebuilt = torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in)
    delta = (weight.double() - rebuilt).reshape(weight.shape[0], -1)  # (C_out, C_in·kh·kw)
    return output_error(delta, second_moment, gain)


def conv_options(
    conv: nn.Conv2d, cfg: TuckerConfig, second_moment: torch.Tensor | None,
    gain: torch.Tensor | None,
) -> LayerOptions[TuckerRanks]:
    """One conv's candidate layouts: their errors and weights, the dense kernel at no error."""
    weight = conv.weight.detach()
    shape, dense = weight.shape, weight.numel()
    uniform = cfg.uniform_ranks(conv)
    layouts = candidate_layouts(shape, uniform)
    errors: dict[TuckerRanks, float] = {
        rs: tucker_error(weight, rs, cfg.iterations, second_moment, gain) for rs in layouts}
    sizes: dict[TuckerRanks, int] = {rs: tucker_params(shape, *rs) for rs in layouts}
    errors[None], sizes[None] = 0.0, dense
    return LayerOptions(errors, sizes, dense if uniform is None else sizes[uniform])


def allocate_tucker_ranks(
    model: nn.Module, convs: dict[str, nn.Conv2d], cfg: TuckerConfig, ctx: StepContext
) -> RankPlan[TuckerRanks]:
    """Measure every conv on the unchanged model, then choose layouts within the budget."""
    data = ctx.calibration
    options: dict[str, LayerOptions[TuckerRanks]] = {}
    if data:
        gains = output_gains(model, convs, data)

        def record(group: dict[str, nn.Module], stats: dict[str, ConvPatchStats]) -> None:
            for name in group:
                options[name] = conv_options(convs[name], cfg, stats[name].second_moment,
                                             gains[name])

        modules: dict[str, nn.Module] = dict(convs)
        sequential_layers(model, modules, data, lambda n, _m: ConvPatchStats(convs[n]),
                          record, progress=ctx.progress, desc="tucker sensitivity")
    else:
        for name, conv in convs.items():
            options[name] = conv_options(conv, cfg, None, None)
    return plan_within_budget({n: options[n] for n in convs}, weighted=bool(data))
