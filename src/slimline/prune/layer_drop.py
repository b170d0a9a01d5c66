"""``layer_drop``: remove whole transformer blocks, the least influential first.

ShortGPT (Men et al., arXiv 2403.03853) measures each block's *Block Influence*

    BI_i = 1 − E_tokens[ cos(X_i, X_{i+1}) ]

where ``X_i`` is the hidden state entering block ``i`` and ``X_{i+1}`` the one leaving it, on
calibration data. A block that barely turns the residual stream (BI ≈ 0) can be removed with
little loss; the ``n_layers`` lowest are dropped. ``criterion="last"`` drops the last blocks
instead, a calibration-free baseline.

After the drop the model is a plain, shallower model of the same class: ``num_hidden_layers``
(and ``layer_types`` when the config has it) are updated and every attention module's
``layer_idx`` is renumbered, so generation with a KV cache and ``sl.save`` → ``sl.load`` work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from slimline.core.batches import Batch, forward
from slimline.core.calibration import find_blocks
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.search.ranges import IntRange, SearchSpace

Criterion = Literal["block_influence", "last"]


@dataclass(frozen=True, kw_only=True)
class LayerDropConfig(MethodConfig):
    """Drop ``n_layers`` whole blocks: the lowest Block Influence (ShortGPT) or the last."""

    method: ClassVar[str] = "layer_drop"
    family: ClassVar[Family] = Family.STRUCTURE
    needs_calibration: ClassVar[bool] = True  # for the default criterion; "last" needs none
    summary: ClassVar[str] = "removes whole transformer blocks with the lowest Block Influence"
    paper: ClassVar[str] = "ShortGPT, arXiv 2403.03853"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"n_layers": IntRange(1, 4)}

    # One block is the cautious default: ShortGPT removes ~25% of a deep model's blocks, but a
    # shallow model has few to spare.
    n_layers: int = 1
    criterion: Criterion = "block_influence"

    def check(self) -> None:
        if self.n_layers < 1:
            self.fail("n_layers", f"must be >= 1, got {self.n_layers}")

    def requires_calibration(self) -> bool:
        return self.criterion == "block_influence"

    def applies_to(self, model: nn.Module) -> bool:
        """Whether ``model`` has a list of at least two repeated blocks."""
        try:
            return len(find_blocks(model)[1]) >= 2
        except ValueError:
            return False

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """The blocks that may be dropped; raises if ``n_layers`` cannot be honoured."""
        _, blocks, candidates = candidate_blocks(model, self)
        return [(name, blocks[i]) for i, name in candidates]


def candidate_blocks(
    model: nn.Module, cfg: LayerDropConfig
) -> tuple[str, nn.ModuleList, list[tuple[int, str]]]:
    """``(prefix, blocks, [(index, name)...])`` of the blocks ``targets`` allows to drop."""
    try:
        prefix, blocks = find_blocks(model)
    except ValueError as exc:
        cfg.fail("n_layers", f"{exc}; layer_drop needs a transformer-style block list")
    config = getattr(model, "config", None)
    if getattr(config, "_heterogeneity_spec", None) is not None:
        cfg.fail("n_layers", "configs with per_layer_config overrides are not supported")
    if cfg.n_layers >= len(blocks):
        cfg.fail("n_layers", f"{cfg.n_layers} must be < the number of blocks ({len(blocks)})")
    names = [(i, f"{prefix}.{i}") for i in range(len(blocks))]
    include, exclude = cfg.targets.include, cfg.targets.exclude
    if include:
        names = [(i, n) for i, n in names if any(fnmatchcase(n, p) for p in include)]
        if not names:
            cfg.fail("targets", f"include {list(include)} matches none of the blocks {prefix}.*")
    names = [(i, n) for i, n in names if not any(fnmatchcase(n, p) for p in exclude)]
    if cfg.n_layers > len(names):
        cfg.fail("n_layers", f"{cfg.n_layers} > the {len(names)} blocks that targets allow")
    return prefix, blocks, names


# ---------------------------------------------------------------- Block Influence (pure maths)


def token_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """cos(X_i, X_{i+1}) per token: (B, T, C), (B, T, C) → (B, T), in float32."""
    return nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum and count of ``values`` (B, T) over real tokens (``mask`` (B, T) == 1, or all)."""
    if mask is None or mask.shape != values.shape:
        return float(values.sum()), values.numel()
    keep = mask.to(torch.bool)
    return float(values[keep].sum()), int(keep.sum())


def block_influence(cos_sum: torch.Tensor, count: int) -> torch.Tensor:
    """BI = 1 − mean cosine (arXiv 2403.03853 eq. 1): (L,) sums over ``count`` tokens → (L,)."""
    return 1.0 - cos_sum / max(count, 1)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _cosine_hooks(blocks: nn.ModuleList, sink: list[torch.Tensor]) -> Iterator[None]:
    """While active, every block appends its token cosines (B, T) to ``sink``, in run order."""
    handles = []
    for block in blocks:

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            sink.append(token_cosine(x_in, _hidden(out)))

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_block_influence(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """BI of every block (L,), on the real (attention-masked) tokens of ``batches``."""
    _, blocks = find_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    for batch in batches:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        cosines: list[torch.Tensor] = []
        with _cosine_hooks(blocks, cosines):
            forward(model, batch)
        if len(cosines) != len(blocks):
            raise ValueError(f"layer_drop: {len(cosines)} of {len(blocks)} blocks ran per batch")
        for i, cos in enumerate(cosines):
            sums[i] += masked_sum(cos, mask)[0]
        count += masked_sum(cosines[0], mask)[1]  # the same tokens pass every block
    return block_influence(sums, count).float()


# ---------------------------------------------------------------- surgery on the block list


def drop_blocks(model: nn.Module, prefix: str, drop: set[int]) -> None:
    """Remove blocks ``drop`` from the list at ``prefix``; renumber and update the config."""
    blocks = model.get_submodule(prefix)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"layer_drop: {prefix} is a {type(blocks).__name__}, not a ModuleList")
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    model.set_submodule(prefix, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (an int, not a submodule)
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers") or id(config) in seen:
            continue
        seen.add(id(config))
        config.num_hidden_layers = len(kept)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(blocks):
            config.layer_types = [t for i, t in enumerate(types) if i not in drop]


def choose_blocks(scores: torch.Tensor, candidates: Sequence[int], n: int) -> list[int]:
    """The ``n`` candidates with the lowest score (ties: the earlier block), ascending."""
    order = torch.argsort(scores[list(candidates)], stable=True)[:n]
    return sorted(candidates[int(i)] for i in order)


@register(LayerDropConfig)
def apply_layer_drop(model: nn.Module, cfg: LayerDropConfig, ctx: StepContext) -> StepOutcome:
    prefix, blocks, candidates = candidate_blocks(model, cfg)
    indices = [i for i, _ in candidates]
    notes = []
    if cfg.criterion == "last":
        drop = indices[-cfg.n_layers:]
    else:
        if not ctx.calibration:
            cfg.fail("criterion", "'block_influence' needs calibration data (or use 'last')")
        bi = measure_block_influence(model, ctx.calibration)
        drop = choose_blocks(bi, indices, cfg.n_layers)
        scores = ", ".join(f"{i}={v:.4f}" for i, v in enumerate(bi.tolist()))
        notes.append(f"block influence: {scores}")
    names = [f"{prefix}.{i}" for i in drop]
    drop_blocks(model, prefix, set(drop))
    notes.append(f"dropped blocks {drop}: {len(blocks)} → {len(blocks) - len(drop)}")
    return StepOutcome(modules=names, notes=notes)
