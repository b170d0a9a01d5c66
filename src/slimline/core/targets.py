"""Which modules a step applies to: include/exclude globs over module names.

The default, as in ARCHITECTURE.md, is every Linear-like layer but the output head. Hugging
Face's GPT-2 ``Conv1D`` (weight stored transposed, (in, out)) counts as Linear-like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Targets:
    """Module-name globs (``fnmatch`` syntax, e.g. ``"*.mlp.*"``) a step applies to.

    ``include`` empty means the method's default selection (all Linear-like layers but the
    output head); ``exclude`` always removes matches.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise TypeError(f"targets.{field_name} must be a list of glob strings")
            if not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"targets.{field_name} must hold non-empty strings")
            object.__setattr__(self, field_name, tuple(value))

    def to_dict(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: Any) -> Targets:
        if isinstance(data, Targets):
            return data
        if not isinstance(data, dict):
            raise TypeError("targets must be a mapping with 'include' and/or 'exclude'")
        unknown = set(data) - {"include", "exclude"}
        if unknown:
            raise ValueError(f"targets: unknown key(s) {sorted(unknown)}; use include/exclude")
        return cls(tuple(data.get("include", ())), tuple(data.get("exclude", ())))


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), matched without import."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D``: a plain matmul with an optional bias."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of a Linear-like module (Conv1D transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(module).__name__}.weight is not a tensor")
        return weight.t()
    raise TypeError(f"{type(module).__name__} is not a Linear-like layer")


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight into a Linear-like module in place (Conv1D transposed)."""
    target = linear_weight(module)
    if target.shape != weight.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(weight.to(target.dtype))


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: the HF output embeddings, else the last Linear-like layer."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        return {name for name, m in model.named_modules() if m is head}
    linear = [name for name, m in model.named_modules() if is_linear_like(m)]
    return {linear[-1]} if linear else set()


def select(
    model: nn.Module,
    targets: Targets,
    *,
    accepts: Callable[[nn.Module], bool] = is_linear_like,
    what: str = "Linear-like",
    step: str = "step",
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` the step applies to, in module order.

    Raises ``ValueError`` when an include glob matches nothing, or matches only modules of a
    kind the method cannot handle (named, with its type), so nothing is skipped silently.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if targets.include:
        chosen = [(n, m) for n, m in named if _matches(n, targets.include)]
        for pattern in targets.include:
            hits = [(n, m) for n, m in chosen if fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f"{step}: targets.include {pattern!r} matches no module")
            if not any(accepts(m) for _, m in hits):
                kinds = sorted({type(m).__name__ for _, m in hits})
                raise ValueError(
                    f"{step}: targets.include {pattern!r} matches only {', '.join(kinds)}; "
                    f"this method handles {what} layers"
                )
        # A glob such as "*.mlp*" also matches containers; keep the layers inside them.
        chosen = [(n, m) for n, m in chosen if accepts(m)]
    else:
        heads = output_head_names(model)
        chosen = [(n, m) for n, m in named if accepts(m) and n not in heads]
    return [(n, m) for n, m in chosen if not _matches(n, targets.exclude)]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)
