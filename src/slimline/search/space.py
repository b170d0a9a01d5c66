"""The search space, built from the method registry: one slot per family, in rule order.

Each method config that declares ``search_space`` (``slimline/search/ranges.py``) is a
candidate; a recipe is sampled as one optional method per family, the families taken in the
order of their rules (``core/families.py``: structure, prune/factorize, quantize/train, cast,
cache), so every sampled sequence passes ``core/recipe.py``'s check by construction — and is
checked there anyway. Methods that cannot run here are left out, each with its reason: those
that train (``distill``, ``lora``, ``qat``) unless training data is given, those that need
calibration unless it is given, and those that do not apply to the model.

A space file (YAML, or the same mapping in Python) narrows the space::

    methods:                      # only these methods
      rtn: {bits: [4, 8]}         # a list: a choice among the declared values
      wanda: {sparsity: {low: 0.3, high: 0.6}}   # a range inside the declared one
      magnitude: {owl: false}     # one value: the field is fixed
      int8_dynamic: {}            # the declared space as it is
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.recipe import Recipe
from slimline.core.registry import config_type, registered
from slimline.search.ranges import Choice, FloatRange, IntRange, Searchable, Suggest

NONE = "none"  # the slot's choice when the family is skipped


@dataclass(frozen=True)
class MethodSpace:
    """One candidate method: the fields searched, and the fields fixed by a space file."""

    config: type[MethodConfig]
    ranges: Mapping[str, Searchable]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def sample(self, trial: Suggest) -> MethodConfig:
        values = {name: r.sample(trial, f"{self.method}.{name}") for name, r in self.ranges.items()}
        return self.config(**{**self.fixed, **values})

    def first(self) -> MethodConfig:
        """The config at the first value of every range (used to check it applies)."""
        values = {name: _first(r) for name, r in self.ranges.items()}
        return self.config(**{**self.fixed, **values})

    def describe(self) -> str:
        parts = [f"{n} {r.describe()}" for n, r in self.ranges.items()]
        parts += [f"{n}={v!r}" for n, v in self.fixed.items()]
        return f"{self.method}({', '.join(parts)})"


@dataclass(frozen=True)
class Space:
    """Candidate methods by family slot, and the methods left out with why."""

    methods: tuple[MethodSpace, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)

    def slots(self) -> list[tuple[Family, list[MethodSpace]]]:
        """Families in recipe order (rank, then declaration), each with its candidates."""
        order = list(Family)
        families = sorted({m.config.family for m in self.methods},
                          key=lambda f: (f.rule.rank, order.index(f)))
        return [(f, [m for m in self.methods if m.config.family is f]) for f in families]

    def sample(self, trial: Suggest) -> Recipe:
        """One recipe: per slot, a method (or none), then its searched fields."""
        steps = []
        for family, candidates in self.slots():
            names = [NONE, *(m.method for m in candidates)]
            chosen = trial.suggest_categorical(family.label, names)
            if chosen != NONE:
                steps.append(next(m for m in candidates if m.method == chosen).sample(trial))
        return Recipe(tuple(steps))

    def single_methods(self) -> list[dict[str, Any]]:
        """Every candidate alone, at its config's defaults where its ranges hold them, as
        Optuna parameters (for ``enqueue_trial``): the search's warm start. A method's
        defaults are its recommended setting; a sampled recipe stacks one method per family,
        and most such stacks break a tight quality bound (see ``runner.py``)."""
        out = []
        for family, candidates in self.slots():
            for method in candidates:
                params: dict[str, Any] = {f.label: NONE for f, _ in self.slots()}
                params[family.label] = method.method
                defaults = method.config(**method.fixed)
                for name, searchable in method.ranges.items():
                    value = getattr(defaults, name)
                    if searchable.contains(value):
                        params[f"{method.method}.{name}"] = value
                out.append(params)
        return out

    def describe(self) -> list[str]:
        lines = [f"{f.label}: " + " | ".join(m.describe() for m in ms) for f, ms in self.slots()]
        lines += [f"left out {name}: {why}" for name, why in sorted(self.excluded.items())]
        return lines


def declared_space(config: type[MethodConfig]) -> Mapping[str, Searchable] | None:
    """The ``search_space`` a config class declares itself (not inherited), checked."""
    declared: Mapping[str, Searchable] | None = vars(config).get("search_space")
    if declared is None:
        return None
    fields = set(config.field_names())
    for name, searchable in declared.items():
        if name not in fields:
            raise TypeError(f"{config.__name__}.search_space names {name!r}, not a field")
        if not isinstance(searchable, (Choice, IntRange, FloatRange)):
            raise TypeError(f"{config.__name__}.search_space[{name!r}] is not a Choice/IntRange/"
                            "FloatRange")
    return declared


def build_space(
    model: nn.Module,
    *,
    calibration: bool,
    training: bool,
    spec: Mapping[str, Any] | str | Path | None = None,
) -> Space:
    """The space for ``model``: every declared method (or those ``spec`` names), narrowed by
    ``spec``, less those that cannot run; ValueError when nothing is left."""
    wanted = _read_spec(spec)
    candidates: list[MethodSpace] = []
    excluded: dict[str, str] = {}
    if wanted is None:
        configs = [c for c in registered() if declared_space(c) is not None]
        wanted = {c.method: {} for c in configs}
    device = _device_type(model)
    for name, fields in wanted.items():
        method = _narrowed(config_type(name), fields)
        why = _why_not(method, model, device, calibration=calibration, training=training)
        if why is None:
            candidates.append(method)
        elif spec is not None:
            raise ValueError(f"space: {name} cannot be searched here: {why}")
        else:
            excluded[name] = why
    if not candidates:
        reasons = "; ".join(f"{n}: {w}" for n, w in sorted(excluded.items())) or "none declared"
        raise ValueError(f"the search space is empty: no method can be searched ({reasons})")
    return Space(tuple(candidates), excluded)


def _narrowed(config: type[MethodConfig], fields: Mapping[str, Any]) -> MethodSpace:
    declared = dict(declared_space(config) or {})
    known = set(config.field_names()) - {"targets"}
    ranges: dict[str, Searchable] = dict(declared)
    fixed: dict[str, Any] = {}
    for name, value in fields.items():
        where = f"space: {config.method}.{name}"
        if name not in known:
            raise ValueError(f"{where}: not a field of {config.method} "
                             f"(fields: {', '.join(sorted(known))})")
        if isinstance(value, (list, Mapping)):
            if name not in declared:
                raise ValueError(f"{where}: not searchable (declared: "
                                 f"{', '.join(declared) or 'none'}); give one value to fix it")
            ranges[name] = declared[name].narrow(value, where)
        else:
            ranges.pop(name, None)
            fixed[name] = value
    method = MethodSpace(config, ranges, fixed)
    try:
        method.first()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"space: {exc}") from None
    return method


def _why_not(method: MethodSpace, model: nn.Module, device: str, *, calibration: bool,
             training: bool) -> str | None:
    """Why ``method`` cannot be searched on ``model`` with the data given, or None. Judged at
    the method's defaults: a value of a range that does not fit one layer fails its trial."""
    config = method.config(**method.fixed)
    if method.config.needs_training and not training:
        return "trains: pass training data to include it"
    if config.requires_calibration() and not calibration:
        return "needs calibration data: pass calibration batches to include it"
    if device not in method.config.devices:
        return f"does not run on {device}"
    if not config.applies_to(model):
        return f"does not apply to {type(model).__name__}"
    try:
        if not config.select_modules(model):
            return f"selects no layer of {type(model).__name__}"
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _read_spec(spec: Mapping[str, Any] | str | Path | None) -> dict[str, dict[str, Any]] | None:
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        spec = read_space_file(spec)
    if not isinstance(spec, Mapping) or set(spec) != {"methods"}:
        raise ValueError("space: expected a mapping with one key, 'methods'")
    methods = spec["methods"]
    if isinstance(methods, list):
        methods = {name: {} for name in methods}
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("space: 'methods' must name at least one method (a list or a mapping)")
    out: dict[str, dict[str, Any]] = {}
    for name, fields in methods.items():
        if fields is not None and not isinstance(fields, Mapping):
            raise ValueError(f"space: {name}: expected a mapping of fields, got {fields!r}")
        out[str(name)] = dict(fields or {})
    return out


def read_space_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) space file as a mapping; ValueError naming the file when unreadable."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"space file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"space file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"space file {str(path)!r}: expected a mapping with 'methods'")
    return data


def _first(searchable: Searchable) -> Any:
    if isinstance(searchable, Choice):
        return searchable.values[0]
    return searchable.low


def _device_type(model: nn.Module) -> str:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device.type
    return "cpu"

