"""``structured``: physically remove attention heads, MLP neurons and conv channels.

Unlike masks, removed units are gone: layers are rebuilt smaller, so the model has fewer
parameters and FLOPs and runs faster on any hardware. Three concerns are kept apart, as in
Torch-Pruning (DepGraph, arXiv 2301.12900) and LLM-Pruner (arXiv 2305.11627):

* coupling — which slices of which tensors form one unit (``groups.py``);
* importance — one score per unit (here), aggregated over the unit's whole coupled group;
* surgery — slicing layers into new, smaller ones (``surgery.py``).

Importance: ``magnitude`` is the group L2 norm of all the unit's weights (DepGraph); ``activation``
is Wanda's |W_ij|·‖X_j‖ (arXiv 2306.11695) summed over the unit's input columns in the layer
that consumes it — a bound on what the unit adds to that layer's output on calibration data,
zero for a unit that contributes nothing. Michel et al. (arXiv 1905.10650) showed many heads
can go with little loss; this is a gradient-free, data-aware proxy for their head importance.
``obs`` ranks units by the output error the least-squares repair leaves, removing them greedily
with Optimal Brain Surgeon updates (ZipLM, arXiv 2302.04089; ``structured_obs.py``): it sees that
correlated units stand in for each other, which per-unit scores cannot. ``auto`` (the default)
is ``obs`` where every consumer of a group is a Linear, ``activation`` elsewhere (conv channels).
On minilm at 50% heads + neurons, 1024 calibration sentences: embedding cosine 0.849 with
``activation``, 0.858 with ``obs`` (validation split).

Repair (``reconstruct``, on by default): the layer that consumed the removed units is refit by
least squares on calibration inputs (kept columns and bias, Kwon et al. arXiv 2204.09656), so
it still produces what it did on average. With calibration data the model is walked block by
block (``core/calibration.walk_blocks``): each block is scored, pruned and repaired on the
outputs of the already-pruned blocks before it, and only one block's statistics are alive.

Counts are uniform: each layer loses ``round(sparsity · units)`` units of each kind (halves
round up), as deployable structured pruning does, so one config value (``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``) still describes every block and
``sl.save`` → ``sl.load`` rebuilds the smaller model from its config. GQA heads (Llama) go by
whole KV groups (``gqa="kv_groups"``) or the same number of query heads in every group
(``gqa="queries"``). BERT's head count cannot be written to its config (see ``groups.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.core.calibration import (
    BlockInputs,
    InputSink,
    capture_inputs,
    find_blocks,
    replay,
    walk_blocks,
)
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.statistics import InputStats
from slimline.core.targets import is_linear_like, select
from slimline.prune.groups import (
    GqaMode,
    UnitGroup,
    UnitKind,
    describe_blocks,
    sequential_groups,
    transformer_groups,
)
from slimline.prune.structured_obs import Consumer, obs_keep
from slimline.prune.surgery import (
    layer_bias,
    layer_weight,
    prune_group,
    refit_linear_,
    unit_features,
)
from slimline.search.ranges import FloatRange, SearchSpace

Importance = Literal["auto", "obs", "activation", "magnitude"]


@dataclass(frozen=True, kw_only=True)
class StructuredConfig(MethodConfig):
    """Remove a share of the heads / neurons / channels of every layer, physically."""

    method: ClassVar[str] = "structured"
    family: ClassVar[Family] = Family.STRUCTURE
    needs_calibration: ClassVar[bool] = True  # for the default importance; magnitude needs none
    summary: ClassVar[str] = "removes whole heads, MLP neurons and conv channels: smaller, faster"
    paper: ClassVar[str] = "LLM-Pruner, arXiv 2305.11627; DepGraph, arXiv 2301.12900"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"sparsity": FloatRange(0.1, 0.5, step=0.05)}

    # Share of the units of each kind removed in every layer. 0.3 keeps most of the quality
    # of a pretrained encoder without retraining; more usually wants a distillation step.
    sparsity: float = 0.3
    units: tuple[UnitKind, ...] = ("heads", "neurons")
    # Data-aware scores rank units far better than weight norms for pretrained models; "auto"
    # is "obs" for units consumed by Linear layers, "activation" for conv channels.
    importance: Importance = "auto"
    # GQA: drop whole KV groups (saves k/v too) or query heads evenly within every group.
    gqa: GqaMode = "kv_groups"
    # Refit each consumer layer by least squares; on MiniLM at 50% it lifts the embedding
    # cosine from 0.66 to 0.78 for the cost of one solve per layer. Needs calibration data.
    reconstruct: bool = True

    def check(self) -> None:
        if self.importance == "obs" and "channels" in self.units:
            self.fail("importance", "'obs' ranks the inputs of Linear consumers; conv channels "
                      "take 'activation' or 'magnitude'")
        if not 0.0 <= self.sparsity < 1.0:
            self.fail("sparsity", f"{self.sparsity} is outside [0, 1)")
        if not self.units:
            self.fail("units", "name at least one of 'heads', 'neurons', 'channels'")
        if len(set(self.units)) != len(self.units):
            self.fail("units", f"{list(self.units)} names a unit kind twice")

    def requires_calibration(self) -> bool:
        return self.importance != "magnitude" or self.reconstruct

    def applies_to(self, model: nn.Module) -> bool:
        """Whether ``model`` has every unit kind in ``units``, in a layout this method knows."""
        chosen = {n for n, m in model.named_modules() if _prunable(m)}
        try:
            for kind in self.units:
                _groups_of_kind(model, kind, self, chosen)
        except ValueError:
            return False
        return True

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Plan the whole pruning on the untouched model, so impossible requests raise first."""
        names = {n for p in plan_structured(model, self) for n, *_ in p.group.specs}
        return [(n, m) for n, m in model.named_modules() if n in names]


@dataclass(frozen=True)
class PlannedGroup:
    """One coupled group and how many of its units go."""

    group: UnitGroup
    n_remove: int


# ---------------------------------------------------------------- planning


def removal_count(n_units: int, partitions: int, sparsity: float) -> int:
    """Units removed from a group: the same nearest count from each partition (halves up)."""
    per = n_units // partitions
    return math.floor(sparsity * per + 0.5) * partitions


def _prunable(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, nn.Conv2d)


def _groups_of_kind(
    model: nn.Module, kind: UnitKind, cfg: StructuredConfig, chosen: set[str]
) -> list[UnitGroup]:
    """Every group of ``kind`` in ``model``; ValueError (``units``) if there is none or the
    layout is not supported. Layers outside ``chosen`` may be unsupported (targets skip them)."""
    model_name = type(model).__name__
    if kind == "channels" and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        cfg.fail("units", f"'channels': {model_name} has no Conv2d layers")
    try:
        found = transformer_groups(model, kind, cfg.gqa) if kind != "channels" else None
    except ValueError as exc:
        cfg.fail("units", f"'{kind}': {exc}")
    if found is not None:
        return found
    if kind == "heads":
        cfg.fail("units", f"'heads': {model_name} has no Llama-, Phi-3-, GPT-NeoX- or "
                 f"BERT-style attention blocks{describe_blocks(model)}")
    try:
        layers = sequential_groups(model, kind)
    except ValueError as exc:
        cfg.fail("units", f"'{kind}': {exc}{describe_blocks(model)}")
    blocked = [f"{n}: {why}" for n, why in layers.items() if isinstance(why, str) and n in chosen]
    if blocked:
        cfg.fail("units", f"'{kind}': cannot prune {'; '.join(blocked)} (exclude it in targets)")
    groups = [g for g in layers.values() if isinstance(g, UnitGroup)]
    if not groups:
        layer = "Conv2d layers feeding another layer" if kind == "channels" else "hidden Linear"
        cfg.fail("units", f"'{kind}': {model_name} has no {layer} to prune")
    return groups


def plan_structured(model: nn.Module, cfg: StructuredConfig) -> list[PlannedGroup]:
    """The groups to prune and how many units each loses; ValueError naming the field if not
    possible (unknown unit kind, unsupported layout, all units of a layer removed)."""
    chosen = {n for n, _ in select(model, cfg.targets, accepts=_prunable,
                                   what="Linear or Conv2d", step=cfg.method)}
    plan: list[PlannedGroup] = []
    for kind in cfg.units:
        every = _groups_of_kind(model, kind, cfg, chosen)
        groups = [g for g in every if all(p in chosen for p in _layer_producers(model, g))]
        if not groups:
            cfg.fail("targets", f"select none of the layers that hold {kind}")
        if every[0].uniform and len(groups) != len(every):
            cfg.fail("targets", f"{kind} are pruned alike in every block (one config value); "
                     f"targets select {len(groups)} of {len(every)} blocks")
        if every[0].uniform and len({g.n_units for g in every}) > 1:
            cfg.fail("units", f"'{kind}': blocks already differ in size; cannot prune them alike")
        for group in groups:
            n = removal_count(group.n_units, group.partitions, cfg.sparsity)
            if n >= group.n_units:
                per = group.n_units // group.partitions
                hint = " per KV group (try gqa='kv_groups')" if group.partitions > 1 else ""
                cfg.fail("sparsity",
                         f"{cfg.sparsity} removes all {per} {kind}{hint} of {group.name}")
            plan.append(PlannedGroup(group, n))
    if cfg.importance == "obs":
        for planned in plan:
            other = _non_linear_consumer(model, planned.group)
            if other is not None:
                cfg.fail("importance",
                         f"'obs' ranks the inputs of Linear layers; {other} (use 'auto')")
    return plan


def _non_linear_consumer(model: nn.Module, group: UnitGroup) -> str | None:
    """``'name' is a Type`` for the first consumer of ``group`` that is not a Linear; None."""
    for piece in group.consumers():
        layer = model.get_submodule(piece.module)
        if not isinstance(layer, nn.Linear):
            return f"{piece.module!r} is a {type(layer).__name__}"
    return None


def _layer_producers(model: nn.Module, group: UnitGroup) -> list[str]:
    return [p for p in group.producers() if _prunable(model.get_submodule(p))]


# ---------------------------------------------------------------- importance (pure maths)


def unit_rows(
    weight: torch.Tensor, axis: str, n_units: int, run: tuple[int, int] | None = None
) -> torch.Tensor:
    """The weight regrouped per unit: (out, in, *k) → (n_units, width·rest) along ``axis``;
    ``run`` (offset, width) takes the units' run of a fused layer (all features without)."""
    w = weight.detach().float()
    if axis == "in":
        w = w.transpose(0, 1)  # (in, out, *k): input features first
    if run is not None:
        w = w.narrow(0, run[0], n_units * run[1])
    return w.reshape(n_units, -1)


def group_l2(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖unit‖₂ over all its coupled slices: each part (n_units, m_i) → (n_units,)."""
    return torch.stack([p.pow(2).sum(1) for p in parts]).sum(0).sqrt()


def wanda_unit_score(weight: torch.Tensor, input_norm: torch.Tensor, n_units: int) -> torch.Tensor:
    """Σ_{j∈unit} ‖X_j‖₂ · Σ_o |W_oj| for a consumer layer (Wanda's score summed per unit).

    ``weight`` (out, in, *k); ``input_norm`` (in,) per input feature/channel → (n_units,).
    """
    per_input = weight.detach().float().abs().transpose(0, 1).reshape(weight.shape[1], -1).sum(1)
    return (per_input * input_norm.float()).reshape(n_units, -1).sum(1)


def unit_scores(
    model: nn.Module, group: UnitGroup, importance: Importance, norms: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(n_units,) importance of each unit of ``group`` in the current model."""
    layers = [(s, model.get_submodule(s.module)) for s in group.slices]
    layers = [(s, m) for s, m in layers if _prunable(m)]
    if importance == "activation":
        parts = [wanda_unit_score(layer_weight(m), norms[s.module], group.n_units)
                 for s, m in layers if s.axis == "in"]
        return torch.stack(parts).sum(0)
    n = group.n_units
    rows = [unit_rows(layer_weight(m), s.axis, n, (s.offset, s.width)) for s, m in layers]
    biases = [(s, layer_bias(m)) for s, m in layers if s.axis == "out"]
    rows += [unit_rows(b, "out", n, (s.offset, s.width)) for s, b in biases if b is not None]
    return group_l2(rows)


def keep_units(scores: torch.Tensor, n_remove: int, partitions: int = 1) -> torch.Tensor:
    """Indices of the units kept, ascending: each of the ``partitions`` equal runs of
    ``scores`` (n,) loses its ``n_remove / partitions`` lowest (ties: the earlier goes)."""
    per, k = scores.numel() // partitions, n_remove // partitions
    order = torch.argsort(scores.reshape(partitions, per), dim=1, stable=True)  # (P, per)
    offsets = torch.arange(partitions, device=scores.device).unsqueeze(1) * per  # (P, 1)
    return (order[:, k:] + offsets).flatten().sort().values


class ConsumerStats:
    """Σ over calibration tokens of a consumer layer's inputs: ‖X_j‖² and, to refit a
    Linear, Σ x̃ x̃ᵀ with x̃ = [x; 1] (the 1 carries the bias)."""

    def __init__(self, module: nn.Module, *, refit: bool) -> None:
        self.conv = isinstance(module, nn.Conv2d)
        n_in = int(layer_weight(module).shape[1])
        self.stats = InputStats(n_in if self.conv else n_in + 1, hessian=refit and not self.conv)

    def add_batch(self, x: torch.Tensor) -> None:
        if self.conv:  # (B, C, H, W) → (B, H, W, C): every pixel is one token of C channels
            self.stats.add_batch(x.movedim(1, -1))
        else:
            self.stats.add_batch(torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1))

    @property
    def input_norm(self) -> torch.Tensor:
        norm = self.stats.input_norm
        return norm if self.conv else norm[:-1]  # (in,)


def collect_stats(
    model: nn.Module, plan: list[PlannedGroup], feed: Callable[[dict[str, nn.Module], InputSink],
                                                               None], refit: bool
) -> dict[str, ConsumerStats]:
    """Statistics of every consumer layer of ``plan``; ``feed(modules, sink)`` runs the
    calibration data and hands each module's real-token inputs to ``sink``."""
    modules = {s.module: model.get_submodule(s.module) for p in plan for s in p.group.consumers()}
    stats = {n: ConsumerStats(m, refit=refit) for n, m in modules.items()}
    with torch.no_grad():
        feed(modules, lambda name, x: stats[name].add_batch(x))
    for name, s in stats.items():
        if s.stats.tokens == 0:
            raise ValueError(f"structured: layer {name!r} saw no calibration inputs")
    return stats


def _ranks_by_obs(model: nn.Module, planned: PlannedGroup, cfg: StructuredConfig) -> bool:
    if cfg.importance == "auto":
        return _non_linear_consumer(model, planned.group) is None
    return cfg.importance == "obs"


def _per_unit(importance: Importance) -> Importance:
    """The per-unit score ``auto`` falls back to where OBS does not apply."""
    return "activation" if importance == "auto" else importance


def obs_units(model: nn.Module, planned: PlannedGroup, stats: dict[str, ConsumerStats]
              ) -> torch.Tensor:
    """Units kept by greedy OBS over the group's Linear consumers (``structured_obs.obs_keep``;
    float64 on the CPU, whatever the model's device). Their statistics carry the Hessian
    (``_needs_hessian``); its 2/n scale changes no ranking."""
    consumers = []
    for piece in planned.group.consumers():
        layer = model.get_submodule(piece.module)
        hessian = stats[piece.module].stats.hessian  # over [x; 1]
        weight, bias = layer_weight(layer).detach(), layer_bias(layer)
        if bias is not None:
            weight = torch.cat([weight, bias.detach().unsqueeze(1)], dim=1)
        else:
            hessian = hessian[:-1, :-1]
        consumers.append(Consumer(weight.cpu(), hessian.cpu(), piece.width))
    group = planned.group
    return obs_keep(consumers, group.n_units, planned.n_remove, partitions=group.partitions)


def prune_groups(
    model: nn.Module, plan: list[PlannedGroup], cfg: StructuredConfig,
    stats: dict[str, ConsumerStats] | None = None,
) -> list[str]:
    """Score every group of ``plan`` first, then repair and cut; returns the layers changed."""
    norms = {n: s.input_norm for n, s in (stats or {}).items()}
    keeps = [obs_units(model, p, stats) if stats is not None and _ranks_by_obs(model, p, cfg)
             else keep_units(unit_scores(model, p.group, _per_unit(cfg.importance), norms),
                             p.n_remove, p.group.partitions) for p in plan]
    changed: list[str] = []
    for planned, keep in zip(plan, keeps, strict=True):
        if cfg.reconstruct and stats is not None:
            for piece in planned.group.consumers():
                xxt = stats[piece.module].stats.xxt
                layer = model.get_submodule(piece.module)
                if isinstance(layer, nn.Linear) and xxt is not None:  # Conv2d: cut, no repair
                    refit_linear_(layer, unit_features(keep, piece.width), xxt)
        changed += prune_group(model, planned.group.specs, keep, planned.group.n_units)
        if planned.group.finish is not None:
            planned.group.finish(model, int(keep.numel()))
    return changed


def _needs_hessian(cfg: StructuredConfig) -> bool:
    return cfg.reconstruct or cfg.importance in ("obs", "auto")


def _prune_with_data(
    model: nn.Module, plan: list[PlannedGroup], cfg: StructuredConfig, batches: list[Batch]
) -> list[str]:
    """Block by block where the model has blocks, then the rest in one pass."""
    changed: list[str] = []
    done: set[int] = set()
    try:
        prefix = find_blocks(model)[0] + "."
    except ValueError:
        prefix = None
    if prefix is not None and any(p.group.name.startswith(prefix) for p in plan):
        for _, block_name, block, inputs in walk_blocks(model, batches):
            mine = [p for p in plan if p.group.name.startswith(block_name + ".")]
            if not mine:
                continue

            def feed(modules: dict[str, nn.Module], sink: InputSink, block: nn.Module = block,
                     inputs: list[BlockInputs] = inputs) -> None:
                replay(block, inputs, modules, sink)

            stats = collect_stats(model, mine, feed, _needs_hessian(cfg))
            changed += prune_groups(model, mine, cfg, stats)
            done |= {id(p) for p in mine}
    rest = [p for p in plan if id(p) not in done]
    if rest:

        def feed_all(modules: dict[str, nn.Module], sink: InputSink) -> None:
            capture_inputs(model, modules, batches, sink)

        stats = collect_stats(model, rest, feed_all, _needs_hessian(cfg))
        changed += prune_groups(model, rest, cfg, stats)
    return changed


# ---------------------------------------------------------------- the handler


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register(StructuredConfig)
def apply_structured(model: nn.Module, cfg: StructuredConfig, ctx: StepContext) -> StepOutcome:
    plan = [p for p in plan_structured(model, cfg) if p.n_remove > 0]
    before = _params(model)
    if cfg.requires_calibration():
        if not ctx.calibration:
            field = "importance" if cfg.importance != "magnitude" else "reconstruct"
            cfg.fail(field, "needs calibration data (or use importance 'magnitude' and "
                     "reconstruct false)")
        changed = _prune_with_data(model, plan, cfg, ctx.calibration)
    else:
        changed = prune_groups(model, plan, cfg)
    for planned in plan:  # config values blocks read at forward time: once all are cut
        if planned.group.settle is not None:
            planned.group.settle(model, planned.group.n_units - planned.n_remove)
    return StepOutcome(modules=list(dict.fromkeys(changed)), notes=_notes(plan, before, model))


def _notes(plan: list[PlannedGroup], before: int, model: nn.Module) -> list[str]:
    if not plan:
        return ["nothing removed: the sparsity rounds to zero units in every layer"]
    notes = []
    for kind in dict.fromkeys(p.group.kind for p in plan):
        mine = [p for p in plan if p.group.kind == kind]
        sizes = sorted({f"{p.group.n_units} → {p.group.n_units - p.n_remove}" for p in mine})
        notes.append(f"{kind}: {', '.join(sizes)} in {len(mine)} layer(s)")
    after = _params(model)
    notes.append(f"parameters: {before:,} → {after:,} ({after / max(before, 1):.1%})")
    return notes
