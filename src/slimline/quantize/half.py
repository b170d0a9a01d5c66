"""``half``: cast a model to bfloat16 or float16, keeping the layers that need fp32 in fp32.

Normalisation layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm) compute statistics whose
precision matters more than their cost, so they stay fp32 (as in mixed-precision training,
Micikevicius et al., arXiv 1710.03740). Forward hooks cast at the boundaries: inputs of a kept
layer go up to fp32, its outputs come back down to the compute dtype, and float inputs of the
whole model are cast to the compute dtype, so the model keeps its call signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import output_head_names, select
from slimline.search.ranges import Choice, SearchSpace

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_HOOKED = "_slimline_half_hooked"


@dataclass(frozen=True, kw_only=True)
class HalfConfig(MethodConfig):
    """Store and compute in a 16-bit float type; norms (and optionally the head) stay fp32."""

    method: ClassVar[str] = "half"
    family: ClassVar[Family] = Family.CAST
    summary: ClassVar[str] = "cast to bfloat16/float16, norms kept in fp32"
    paper: ClassVar[str] = "Mixed precision training, arXiv 1710.03740"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"dtype": Choice("bfloat16", "float16")}
    reapply_on_load: ClassVar[bool] = True  # the dtype hooks are not tensors

    # bfloat16 keeps fp32's exponent range (no overflow in attention scores); float16 has
    # more mantissa but can overflow, so it is the opt-in.
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    # Norm statistics are cheap and precision-sensitive.
    keep_norms: bool = True
    # A language model's head decides the next token; fp32 there can buy back quality.
    keep_head: bool = False

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Modules whose own parameters are cast (targets narrow the default: all of them)."""
        kept = self.kept_names(model)
        chosen = select(
            model, self.targets, accepts=_has_float_params, what="parametrised", step=step
        ) if self.targets.include else [
            (n, m) for n, m in model.named_modules() if _has_float_params(m)
        ]
        exclude = self.targets.exclude
        return [(n, m) for n, m in chosen if n not in kept and not _matches(n, exclude)]

    def kept_names(self, model: nn.Module) -> set[str]:
        kept = {n for n, m in model.named_modules() if self.keep_norms and is_norm(m)}
        if self.keep_head:
            kept |= output_head_names(model)
        return kept


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers, including HF's RMSNorm classes (matched by name, no import)."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    named_norm = type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
    return isinstance(module, norm_types) or named_norm


def _has_float_params(module: nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _cast_tree(value: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors in (nested tuples/lists/dicts of) ``value`` to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast_tree(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_tree(v, dtype) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value


def _install_hooks(module: nn.Module, before: torch.dtype, after: torch.dtype | None) -> None:
    """Cast float inputs to ``before`` and (if given) float outputs to ``after``, once."""
    if getattr(module, _HOOKED, False):
        return

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _cast_tree(args, before), _cast_tree(kwargs, before)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    if after is not None:
        module.register_forward_hook(lambda _m, _a, out: _cast_tree(out, after))
    setattr(module, _HOOKED, True)


@register(HalfConfig)
def apply_half(model: nn.Module, cfg: HalfConfig, ctx: StepContext) -> StepOutcome:
    dtype = _DTYPES[cfg.dtype]
    chosen = cfg.select_modules(model)
    with torch.no_grad():
        for _, module in chosen:
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
    kept = sorted(cfg.kept_names(model))
    heads = output_head_names(model) if cfg.keep_head else set()
    for name in kept:
        # A kept head's fp32 logits are the model's answer: they are not cast back down.
        after = None if name in heads else dtype
        _install_hooks(model.get_submodule(name), torch.float32, after)
    _install_hooks(model, dtype, None)
    notes = [f"kept in fp32: {len(kept)} module(s)"] if kept else []
    return StepOutcome(modules=[n for n, _ in chosen], notes=notes)
