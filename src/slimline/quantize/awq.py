"""``awq``: activation-aware weight quantization (Lin et al., arXiv 2306.00978).

A few input channels of each layer carry much larger activations than the rest; their weights
matter most, yet round-to-nearest gives them the same relative error. AWQ protects them by an
exact rewrite before quantizing: ``y = W x = (W·diag(s)) (diag(s)⁻¹ x)``, with ``s = s_x^α``
from the mean absolute activation ``s_x`` per input channel (§3.2). The ``1/s`` is folded into
the op that produces ``x`` — a norm's weight (and bias), or the rows of a previous Linear —
so the float model is unchanged and only the rounding of ``W·diag(s)`` differs. Per block:

record each layer's inputs; for each group of layers sharing one foldable input
(:data:`FOLD_RULES`) grid-search α ∈ [0, 1) for the lowest quantized output error (α = 0 is
RTN, so never worse on the calibration tokens) and fold s; search a per-group clipping of
each weight (§3.2); quantize with ``rtn``'s grid and packing. Blocks are walked in order
(:func:`~slimline.core.calibration.walk_blocks`): each is calibrated on the outputs of the
already quantized ones. Layers with no foldable preceding op are clipped only (see notes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from slimline.core.batches import Batch
from slimline.core.calibration import (
    BlockInputs,
    InputSink,
    capture_inputs,
    find_blocks,
    replay,
    walk_blocks,
)
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import TokenSample
from slimline.core.targets import is_linear_like, linear_weight, set_linear_weight
from slimline.quantize.packing import (
    dequantize,
    effective_group,
    expand_groups,
    quantize_groups,
    to_groups,
)
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.weight_only import WeightGridConfig
from slimline.search.ranges import Choice, SearchSpace

# Tokens per layer for the clipping search (the reference's 512): its cost is N·K·T per point.
_CLIP_TOKENS = 512
# Elements of one (rows, tokens, groups) error tensor in the clipping search: bounds memory.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, kw_only=True)
class AwqConfig(WeightGridConfig):
    """AWQ: ``rtn``'s grid and packing, after activation-aware scaling and clipping."""

    method: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    summary: ClassVar[str] = "activation-aware scaling + clipping, then int2–int8 RTN, packed"
    paper: ClassVar[str] = "AWQ, arXiv 2306.00978"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {
        "bits": Choice(3, 4, 8),
        "group_size": Choice(32, 64, 128),
    }

    # α ∈ {0, 1/20, ..., 19/20}: the paper's grid; finer grids change little.
    grid: int = 20
    # Shrinking each group's range trades clipping error for finer steps; helps most ≤ 4 bits.
    clip: bool = True
    # Shrink factors tried per group, evenly from 1 down to 1 − max_shrink.
    clip_grid: int = 20
    # The reference never shrinks a group's max|w| below half.
    max_shrink: float = 0.5
    # Tokens kept per layer for the searches (s_x uses every token): bounds memory and time.
    max_tokens: int = 4096

    def check(self) -> None:
        super().check()
        for name in ("grid", "clip_grid", "max_tokens"):
            value = getattr(self, name)
            if value < 1:
                self.fail(name, f"must be ≥ 1, got {value}")
        if not 0.0 <= self.max_shrink < 1.0:
            self.fail("max_shrink", f"{self.max_shrink} is outside [0, 1)")


def fake_quantize(weight: torch.Tensor, cfg: WeightGridConfig) -> torch.Tensor:
    """(N, K) weight rounded to ``cfg``'s grid and back to float32 (what inference sees)."""
    q, scales, zeros = quantize_groups(weight, cfg.bits, cfg.group_size, cfg.symmetric)
    return dequantize(q, scales, zeros, cfg.group_size)


def awq_scale(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_x^α`` (K,), normalised so that max(s)·min(s) = 1 (keeps weights in range)."""
    s = s_x.float().pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of ``x Wᵀ`` and ``x Ŵᵀ``; x (T, K), W and Ŵ (N, K)."""
    return (x @ (weight - approx).t()).pow(2).mean()


def awq_search_scale(
    weights: Sequence[torch.Tensor], x: torch.Tensor, s_x: torch.Tensor, cfg: AwqConfig
) -> torch.Tensor:
    """The per-input-channel scale s (K,) minimising the group's quantized output error.

    ``weights`` are (N_i, K) layers reading the same input ``x`` (T, K); ``s_x`` (K,) is the
    mean |x| per channel. Candidate ``s = s_x^α`` (α on ``cfg.grid`` points in [0, 1)) is
    judged by ``Σ_i ‖x W_iᵀ − (x/s) Q(W_i·diag(s))ᵀ‖²`` (arXiv 2306.00978, Eq. 4–5).
    """
    x = x.float()
    best_err, best = float("inf"), torch.ones_like(s_x, dtype=torch.float32)
    for i in range(cfg.grid):
        s = awq_scale(s_x, i / cfg.grid)  # (K,)
        err = sum(
            float(output_error(x, w.float(), fake_quantize(w.float() * s, cfg) / s))
            for w in weights
        )
        if err < best_err:
            best_err, best = err, s
    return best


def clip_weight(weight: torch.Tensor, max_val: torch.Tensor, group_size: int | None
                ) -> torch.Tensor:
    """(N, K) weight clamped to ``[-m, m]`` with ``m = max_val`` (N, G) of each group."""
    group = effective_group(weight.shape[1], group_size)
    m = expand_groups(max_val, weight.shape[1], group)  # (N, K)
    return torch.maximum(torch.minimum(weight, m), -m)


def awq_clip(weight: torch.Tensor, x: torch.Tensor, cfg: AwqConfig) -> torch.Tensor:
    """Per-group clipping bound max_val (N, G) minimising each group's output error.

    Each group's max|w| is shrunk by factors from 1 down to ``1 − max_shrink``; for every
    (row, group) the factor with the lowest error of the group's partial output
    ``x_g · w_gᵀ`` over the tokens of ``x`` (T, K) is kept (arXiv 2306.00978, §3.2).
    """
    w = weight.float()
    n, k = w.shape
    group = effective_group(k, cfg.group_size)
    xg = to_groups(x.float(), group)  # (T, G, group)
    org_max = to_groups(w.abs(), group).amax(dim=-1)  # (N, G)
    best_err = torch.full_like(org_max, float("inf"))
    best = org_max.clone()
    steps = cfg.clip_grid - 1
    rows = max(1, _CHUNK_ELEMENTS // max(1, xg.shape[0] * xg.shape[1]))
    for i in range(cfg.clip_grid):
        max_val = org_max * (1.0 - cfg.max_shrink * i / steps if steps else 1.0)  # (N, G)
        delta = to_groups(w - fake_quantize(clip_weight(w, max_val, cfg.group_size), cfg),
                               group)  # (N, G, group)
        err = torch.cat([
            torch.einsum("tgc,ngc->ntg", xg, delta[r:r + rows]).pow(2).mean(dim=1)
            for r in range(0, n, rows)
        ])  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, max_val, best)
    return best


Condition = Callable[[nn.Module], "str | None"]  # why the rule fails in this block, or None


def _pre_norm(block: nn.Module) -> str | None:
    if getattr(block, "do_layer_norm_before", True):
        return None
    return "post-LN block: the norm's output is also the residual"


def _relu_between(block: nn.Module) -> str | None:
    if isinstance(getattr(block, "activation_fn", None), nn.ReLU):
        return None  # ReLU(x/s) = ReLU(x)/s for s > 0
    return "the activation between them is not ReLU, so 1/s cannot pass through it"


@dataclass(frozen=True)
class FoldRule:
    """``prev``'s output is the input of ``layers`` and of nothing else (names in a block)."""

    prev: str
    layers: tuple[str, ...]
    condition: Condition | None = None


# Names of Hugging Face blocks. Llama / Mistral / Qwen2 (pre-norm, SwiGLU: down_proj reads
# act(gate)·up, linear in up); OPT (pre-norm when do_layer_norm_before, ReLU MLP); GPT-2
# (pre-norm); BERT is post-LN — its LayerNorm outputs are also the residual, and GELU sits
# before output.dense — so only value → attention.output.dense folds there. A v → o pair is
# skipped by the shape check under grouped-query attention (v has fewer outputs than o inputs).
FOLD_RULES: tuple[FoldRule, ...] = (
    FoldRule("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FoldRule("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    FoldRule("self_attn.v_proj", ("self_attn.o_proj",)),
    FoldRule("mlp.up_proj", ("mlp.down_proj",)),
    FoldRule("self_attn_layer_norm",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _pre_norm),
    FoldRule("final_layer_norm", ("fc1",), _pre_norm),
    FoldRule("self_attn.v_proj", ("self_attn.out_proj",)),
    FoldRule("fc1", ("fc2",), _relu_between),
    FoldRule("ln_1", ("attn.c_attn",)),
    FoldRule("ln_2", ("mlp.c_fc",)),
    FoldRule("attention.self.value", ("attention.output.dense",)),
)


def _norm_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a norm computing ``normalise(x) · weight (+ bias)`` — dividing weight
    (and bias) by s divides its output by s — else None (Gemma's ``1 + weight`` norm)."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    plain = name.endswith(("RMSNorm", "LayerNorm")) and not name.startswith("Gemma")
    return weight if plain and isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def _out_width(module: nn.Module) -> int | None:
    if is_linear_like(module):
        return int(linear_weight(module).shape[0])
    weight = _norm_weight(module)
    return None if weight is None else int(weight.shape[0])


def fold_groups(block: nn.Module) -> tuple[list[FoldRule], list[str]]:
    """The rules that hold in ``block``, and why the others present in it do not."""
    names = dict(block.named_modules())
    found, skipped = [], []
    for rule in FOLD_RULES:
        if not all(n in names for n in (rule.prev, *rule.layers)):
            continue
        reason = rule.condition(block) if rule.condition else None
        width = _out_width(names[rule.prev])
        if reason is None and width is None:
            reason = f"{type(names[rule.prev]).__name__} cannot absorb a per-channel scale"
        fits = all(is_linear_like(m) and linear_weight(m).shape[1] == width
                   for m in (names[n] for n in rule.layers))
        if reason is None and not fits:
            reason = "shapes differ (grouped-query attention?)"
        if reason is None:
            found.append(rule)
        else:
            skipped.append(f"{rule.prev} → {', '.join(rule.layers)}: {reason}")
    return found, skipped


@torch.no_grad()
def fold_scale(prev: nn.Module, layers: Sequence[nn.Module], s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by s (K,) and multiply ``layers``' inputs by s."""
    if is_linear_like(prev):
        w = linear_weight(prev)
        set_linear_weight(prev, w.float() / s.to(w.device)[:, None])
    else:
        weight = _norm_weight(prev)
        if weight is None:
            raise TypeError(f"{type(prev).__name__} cannot absorb a per-channel scale")
        weight.div_(s.to(weight))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias))
    for layer in layers:
        w = linear_weight(layer)
        set_linear_weight(layer, w.float() * s.to(w.device))


class _LayerInputs:
    """Mean |x| per channel over every token, and a uniform sample of ``limit`` tokens (T, K)
    that does not depend on how the tokens were batched."""

    def __init__(self, limit: int) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        self.kept = TokenSample(limit)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
        # float64 sums: the mean does not depend on how the tokens were batched
        total = flat.abs().double().sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.tokens += flat.shape[0]
        self.kept.add(flat)

    @property
    def mean_abs(self) -> torch.Tensor:  # (K,); _record made sure tokens > 0
        if self.abs_sum is None:
            return torch.zeros(0)
        return (self.abs_sum / self.tokens).float()

    def sample(self, limit: int | None = None) -> torch.Tensor:
        x = self.kept.rows
        return x if limit is None else x[:: max(1, x.shape[0] // limit)][:limit]

    def rescale(self, s: torch.Tensor) -> None:
        """The layer now reads x / s."""
        self.kept.map_rows(lambda rows: rows / s)


def _quantize_layer(module: nn.Module, x: torch.Tensor, cfg: AwqConfig) -> QuantLinear:
    weight = linear_weight(module).detach().float()  # (N, K)
    if cfg.clip:
        weight = clip_weight(weight, awq_clip(weight, x, cfg), cfg.group_size)
    q, scales, zeros = quantize_groups(weight, cfg.bits, cfg.group_size, cfg.symmetric)
    return QuantLinear.from_codes(
        q, scales, zeros, bias=getattr(module, "bias", None), bits=cfg.bits,
        group_size=cfg.group_size, symmetric=cfg.symmetric,
        decode_activations=cfg.decode_activations,
    ).to(weight.device)  # fmt: skip


def _record(layers: dict[str, nn.Module], limit: int,
            run: Callable[[InputSink], None]) -> dict[str, _LayerInputs]:
    stats = {name: _LayerInputs(limit) for name in layers}
    run(lambda name, x: stats[name].add(x))
    if silent := [name for name, st in stats.items() if st.tokens == 0]:
        raise ValueError(f"awq: layer {silent[0]!r} saw no calibration inputs")
    return stats


def _awq_block(block: nn.Module, chosen: dict[str, nn.Module], stats: dict[str, _LayerInputs],
               cfg: AwqConfig, notes: set[str]) -> list[str]:
    """Scale, clip and quantize the ``chosen`` layers (names relative to ``block``)."""
    rules, skipped = fold_groups(block)
    notes.update(f"not scaled: {line}" for line in skipped)
    scaled: list[str] = []
    for rule in rules:
        searched = [n for n in rule.layers if n in chosen]
        if not searched:
            continue
        first = stats[searched[0]]
        weights = [linear_weight(chosen[n]).detach() for n in searched]
        s = awq_search_scale(weights, first.sample(), first.mean_abs, cfg)  # (K,)
        fold_scale(block.get_submodule(rule.prev), [block.get_submodule(n) for n in rule.layers], s)
        for n in searched:
            stats[n].rescale(s)
        scaled += searched
    for name, module in chosen.items():
        block.set_submodule(name, _quantize_layer(module, stats[name].sample(_CLIP_TOKENS), cfg))
    return [n for n in chosen if n not in scaled]


@register(AwqConfig)
def apply_awq(model: nn.Module, cfg: AwqConfig, ctx: StepContext) -> StepOutcome:
    """AWQ every selected Linear-like layer of ``model``, block by block."""
    if not ctx.calibration:
        raise ValueError("awq needs calibration data")
    batches = list(ctx.calibration)
    chosen = dict(cfg.select_modules(model))
    notes: set[str] = set()
    unscaled: list[str] = []
    try:
        find_blocks(model)
    except ValueError:  # no repeated blocks (a CNN, an MLP): every layer is handled below
        inside: list[str] = []
    else:
        inside = _walk(model, batches, chosen, cfg, ctx, notes, unscaled)
    rest = {n: m for n, m in chosen.items() if n not in set(inside)}
    if rest:
        stats = _record(rest, cfg.max_tokens,
                        lambda sink: capture_inputs(model, rest, batches, sink))
        for name, module in rest.items():
            x = stats[name].sample(_CLIP_TOKENS)
            model.set_submodule(name, _quantize_layer(module, x, cfg))
        unscaled += list(rest)
    groups = "per-channel" if cfg.group_size is None else f"groups of {cfg.group_size}"
    clip = "clipped" if cfg.clip else "unclipped"
    summary = [f"{len(chosen)} layers to int{cfg.bits}, {groups}, {clip}; "
               f"{len(chosen) - len(unscaled)} activation-aware scaled"]
    if unscaled:
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in unscaled}))
        summary.append(f"{len(unscaled)} layers have no foldable preceding op ({shown}): "
                       "RTN + clipping only")
    return StepOutcome(modules=list(chosen), notes=summary + sorted(notes))


def _replay(block: nn.Module, inputs: Sequence[BlockInputs], layers: dict[str, nn.Module]
            ) -> Callable[[InputSink], None]:
    """Run ``block`` on its recorded inputs, feeding ``layers``' real-token inputs to a sink."""
    return lambda sink: replay(block, inputs, layers, sink)


def _walk(model: nn.Module, batches: list[Batch], chosen: dict[str, nn.Module], cfg: AwqConfig,
          ctx: StepContext, notes: set[str], unscaled: list[str]) -> list[str]:
    """AWQ the layers inside blocks, in order; returns their (model-level) names."""
    done: list[str] = []
    walk = tqdm(walk_blocks(model, batches), total=len(find_blocks(model)[1]), desc="awq",
                unit="block", disable=not ctx.progress, leave=False)
    for _, block_name, block, inputs in walk:
        prefix = block_name + "."
        local = {n[len(prefix):]: m for n, m in chosen.items() if n.startswith(prefix)}
        if not local:
            continue
        stats = _record(local, cfg.max_tokens, _replay(block, inputs, local))
        unscaled += [prefix + n for n in _awq_block(block, local, stats, cfg, notes)]
        done += [prefix + n for n in local]
    return done
