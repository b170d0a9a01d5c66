"""``tucker``: Tucker-2 decomposition of convolutions (Kim et al., arXiv 1511.06530).

A Conv2d kernel W (C_out, C_in, kh, kw) is decomposed along its two channel modes only,
W ≈ G ×₀ U_out ×₁ U_in with G (r_out, r_in, kh, kw), and the layer becomes three:
a 1×1 conv (C_in → r_in, U_inᵀ), the k×k core (r_in → r_out, G, the original stride,
padding and dilation), a 1×1 conv (r_out → C_out, U_out, the bias). The factors start from
the truncated HOSVD (each mode's leading singular vectors) and are refined by HOOI
(De Lathauwer et al. 2000), which lowers ‖W − W'‖_F at every iteration; at full ranks the
decomposition is exact.

Ranks: ``ratio`` keeps that fraction of the kernel's weights, with r_in / C_in ≈ r_out / C_out;
``rank: vbmf`` takes each mode's rank from EVBMF on its unfolding (as Kim et al. do), and a
layer whose estimated ranks would not save weights stays dense. ``allocation: sensitivity``
spends the weights those uniform choices would spend, layer by layer where the measured
error is least (:mod:`slimline.factorize.tucker_allocate`, the knapsack of the matrix methods).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import select
from slimline.factorize.base import DEFAULT_RATIO, Allocation
from slimline.factorize.layers import TuckerConv2d
from slimline.factorize.swaps import undone_on_failure
from slimline.factorize.vbmf import evbmf
from slimline.search.ranges import FloatRange, SearchSpace


@dataclass(frozen=True, kw_only=True)
class TuckerConfig(MethodConfig):
    """Tucker-2 of every (default: every non-1×1, ungrouped) Conv2d; ``ratio`` or ``rank``."""

    method: ClassVar[str] = "tucker"
    family: ClassVar[Family] = Family.FACTORIZE
    summary: ClassVar[str] = "Tucker-2 of Conv2d kernels: 1×1 → k×k core → 1×1"
    paper: ClassVar[str] = "Kim et al., arXiv 1511.06530 (Tucker-2 + VBMF ranks)"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"ratio": FloatRange(0.2, 0.9, step=0.05)}

    # ``vbmf``: ranks estimated per layer by EVBMF (Nakajima et al. 2013); else by ratio.
    rank: Literal["vbmf"] | None = None
    # Fraction of each kernel's weights kept (none given: 0.5).
    ratio: float | None = None
    # HOOI sweeps after the HOSVD start; each lowers the error, most of the gain is in the
    # first few (exact at full ranks either way).
    iterations: int = 5
    # ``sensitivity``: ranks differ by layer, chosen by measured output error (K-FAC with
    # calibration data, ‖ΔW‖² without) under the weights the uniform choice would spend.
    allocation: Allocation = "uniform"

    def check(self) -> None:
        if self.rank is not None and self.ratio is not None:
            self.fail("ratio", "give one of rank, ratio, not both")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            self.fail("ratio", f"{self.ratio} is outside (0, 1)")
        if self.iterations < 0:
            self.fail("iterations", f"must be ≥ 0, got {self.iterations}")

    def applies_to(self, model: nn.Module) -> bool:
        return any(_default_conv(m) for m in model.modules())

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        step = step or self.method
        if not self.targets.include and not self.applies_to(model):
            raise ValueError(f"{step}: {type(model).__name__} has no Conv2d with a k×k kernel "
                             "(k > 1) and groups=1 to decompose")
        chosen = select(model, self.targets, accepts=_supported_conv, what="Conv2d (groups=1)",
                        step=step)
        if not self.targets.include:
            chosen = [(n, m) for n, m in chosen if _default_conv(m)]
        ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
        for name, conv in chosen:
            shape = _kernel_shape(conv)
            if self.rank is None and tucker_ranks_for_ratio(shape, ratio) is None:
                self.fail("ratio", f"{ratio} is below what rank (1, 1) keeps of {name} {shape}")
        return chosen

    def uniform_ranks(self, conv: nn.Conv2d) -> tuple[int, int] | None:
        """(r_out, r_in) by ``rank`` or ``ratio`` for ``conv``; None where they save nothing."""
        shape = conv.weight.shape
        ranks = vbmf_ranks(conv.weight) if self.rank == "vbmf" \
            else tucker_ranks_for_ratio(shape, DEFAULT_RATIO if self.ratio is None else self.ratio)
        if ranks is None or tucker_params(shape, *ranks) >= conv.weight.numel():
            return None
        return ranks


def _supported_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def _default_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and _supported_conv(module) \
        and tuple(module.kernel_size) != (1, 1)


def _kernel_shape(conv: nn.Module) -> tuple[int, ...]:
    """(C_out, C_in, kh, kw) of a Conv2d."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"tucker: expected a Conv2d, got {type(conv).__name__}")
    return tuple(conv.weight.shape)


def tucker_params(shape: torch.Size | tuple[int, ...], r_out: int, r_in: int) -> int:
    """Weights of the three convs: C_in·r_in + r_in·r_out·kh·kw + r_out·C_out."""
    c_out, c_in, kh, kw = shape
    return c_in * r_in + r_in * r_out * kh * kw + r_out * c_out


def tucker_ranks_for_ratio(
    shape: torch.Size | tuple[int, ...], ratio: float
) -> tuple[int, int] | None:
    """The largest (r_out, r_in), r_in ≈ r_out·C_in/C_out, within ``ratio`` of the weights."""
    c_out, c_in = shape[0], shape[1]
    budget = ratio * math.prod(shape)
    for r_out in range(c_out, 0, -1):
        r_in = min(c_in, max(1, round(r_out * c_in / c_out)))
        if tucker_params(shape, r_out, r_in) <= budget:
            return r_out, r_in
    return None


def _leading(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``mat`` (rows, cols) → (rows, rank)."""
    u, _, _ = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :rank]


def tucker2(
    weight: torch.Tensor, r_out: int, r_in: int, iterations: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of W (C_out, C_in, kh, kw): U_out (C_out, r_out), G (r_out, r_in, kh, kw),
    U_in (C_in, r_in), with W ≈ Σ U_out[o, a] G[a, b, :, :] U_in[i, b]. Float64."""
    w = weight.double()
    c_out, c_in = w.shape[:2]
    u_out = _leading(w.reshape(c_out, -1), r_out)  # mode-0 unfolding (C_out, C_in·kh·kw)
    u_in = _leading(w.transpose(0, 1).reshape(c_in, -1), r_in)  # mode-1 (C_in, C_out·kh·kw)
    for _ in range(iterations):  # HOOI: each mode against the other's projection
        proj_in = torch.einsum("oikl,ib->obkl", w, u_in)  # (C_out, r_in, kh, kw)
        u_out = _leading(proj_in.reshape(c_out, -1), r_out)
        proj_out = torch.einsum("oikl,oa->iakl", w, u_out)  # (C_in, r_out, kh, kw)
        u_in = _leading(proj_out.reshape(c_in, -1), r_in)
    core = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in)  # (r_out, r_in, kh, kw)
    return u_out, core, u_in


def vbmf_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """(r_out, r_in) from EVBMF on the mode-0 and mode-1 unfoldings (at least 1 each)."""
    w = weight.detach().double()
    c_out, c_in = w.shape[:2]
    r_out = evbmf(w.reshape(c_out, -1)).rank
    r_in = evbmf(w.transpose(0, 1).reshape(c_in, -1)).rank
    return max(1, r_out), max(1, r_in)


def tucker_layer(conv: nn.Conv2d, r_out: int, r_in: int, iterations: int) -> TuckerConv2d:
    """The Tucker-2 replacement of ``conv`` at ranks (r_out, r_in)."""
    weight = conv.weight.detach()
    u_out, core, u_in = tucker2(weight, r_out, r_in, iterations)
    layer = TuckerConv2d(
        conv.in_channels, conv.out_channels, (r_in, r_out), _pair(conv.kernel_size),
        stride=_pair(conv.stride), padding=_pair(conv.padding), dilation=_pair(conv.dilation),
        bias=conv.bias is not None, dtype=weight.dtype,
    ).to(weight.device)
    with torch.no_grad():
        layer.first.weight.copy_(u_in.t()[:, :, None, None])  # (r_in, C_in, 1, 1)
        layer.core.weight.copy_(core)
        layer.last.weight.copy_(u_out[:, :, None, None])  # (C_out, r_out, 1, 1)
        if conv.bias is not None and layer.last.bias is not None:
            layer.last.bias.copy_(conv.bias)
    return layer


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise TypeError(f"expected an int or a pair, got {value!r}")


@register(TuckerConfig)
def apply_tucker(model: nn.Module, cfg: TuckerConfig, ctx: StepContext) -> StepOutcome:
    from slimline.factorize.tucker_allocate import allocate_tucker_ranks

    chosen: dict[str, nn.Conv2d] = {}
    for name, conv in cfg.select_modules(model):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"tucker: {name} is a {type(conv).__name__}, not a Conv2d")
        chosen[name] = conv
    plan = allocate_tucker_ranks(model, chosen, cfg, ctx) if cfg.allocation == "sensitivity" \
        else None
    done, dense, kept, total = [], [], 0, 0
    with undone_on_failure(model) as swaps:  # all or nothing
        for name, conv in chosen.items():
            ranks = cfg.uniform_ranks(conv) if plan is None else plan.ranks[name]
            total += conv.weight.numel()
            if ranks is None:
                dense.append(name)
                kept += conv.weight.numel()
                continue
            swaps.replace(name, tucker_layer(conv, *ranks, cfg.iterations))
            done.append(f"{name} {ranks}")
            kept += tucker_params(conv.weight.shape, *ranks)
    notes = [f"{len(done)} convs decomposed (r_out, r_in): {', '.join(done)}; "
             f"kernel weights kept: {kept / max(total, 1):.4f} of {total}"]
    if dense:
        why = "the allocation's choice" if plan is not None else "ranks would not save weights"
        notes.append(f"kept dense ({why}): {', '.join(dense)}")
    if plan is not None:
        notes.append(str(plan))
    return StepOutcome(modules=[d.split(" ")[0] for d in done], notes=notes)
