"""The base of every method's configuration: a typed, validated, serialisable dataclass.

Each method declares a frozen dataclass subclass of :class:`MethodConfig` with its own fields
and ``ClassVar`` metadata (name, family, needs). Types are checked from the annotations, so a
wrong type is caught for every field of every method without per-method code; range checks
live in each config's ``check()``. ``from_dict`` rejects unknown fields, naming them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from torch import nn

from slimline.core.families import Family
from slimline.core.targets import Targets, is_linear_like, select

C = TypeVar("C", bound="MethodConfig")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base configuration shared by every recipe step.

    Subclasses set ``method`` (the recipe name), ``family``, and the capability flags shown by
    ``sl.list_methods()``; they add typed fields and override :meth:`check` for ranges.
    """

    method: ClassVar[str] = ""
    family: ClassVar[Family]
    needs_calibration: ClassVar[bool] = False
    needs_training: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # True when part of the step's effect is not in the tensors (compile, dtype hooks): the
    # handler is run again by ``load`` on the rebuilt model, so it must be idempotent.
    reapply_on_load: ClassVar[bool] = False

    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], f"{self.method}.{f.name}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.check()

    def check(self) -> None:
        """Range and consistency checks; raise ValueError naming the field. Override."""

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """The modules this step applies to (default: Linear-like layers but the head).

        ``compress`` calls it on the untouched model first, so a target that matches nothing
        or a layer kind the method cannot handle is reported before anything changes.
        Methods that act on other layer kinds, or on the whole model, override it.
        """
        return select(model, self.targets, accepts=is_linear_like, step=step or self.method)

    def applies_to(self, model: nn.Module) -> bool:
        """Whether the method can act on this kind of model at all (e.g. ``layer_drop`` needs
        a list of blocks). Where it is False, ``compress`` raises a ValueError naming why."""
        return True

    def requires_calibration(self) -> bool:
        """Whether this step, with these fields, needs calibration data (default: the class's)."""
        return self.needs_calibration

    def needs_original(self) -> bool:
        """Whether the step needs the model as it was before the recipe (``ctx.original``,
        e.g. a distillation teacher); ``compress`` then keeps it. Default: no."""
        return False

    def fail(self, field_name: str, message: str) -> typing.NoReturn:
        """Raise the ValueError every config uses: ``method.field: message``."""
        raise ValueError(f"{self.method}.{field_name}: {message}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, ``method`` first; ``from_dict`` inverts it exactly."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a recipe step dict (``method`` key optional); unknown keys raise."""
        data = dict(data)
        name = data.pop("method", cls.method)
        if name != cls.method:
            raise ValueError(f"{cls.method}: got method {name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.method}: unknown field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(known))}"
            )
        if "targets" in data:
            try:
                data["targets"] = Targets.from_dict(data["targets"])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{cls.method}.{exc}") from None
        return cls(**data)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``hint``; lists become tuples, str become Enum."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{where}: {value!r} is not {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(f"{where}: expected null")
    if origin is Literal:
        if value in get_args(hint) and type(value) in {type(a) for a in get_args(hint)}:
            return value
        allowed = ", ".join(repr(a) for a in get_args(hint))
        raise ValueError(f"{where}: {value!r} is not one of {allowed}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(hint)[:1]
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
    if isinstance(hint, type) and issubclass(hint, Enum):
        if isinstance(value, hint):
            return value
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise ValueError(f"{where}: {value!r} is not one of {allowed}") from None
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{where}: expected a number, got {type(value).__name__}")
    if hint is int or hint is bool or hint is str:
        if type(value) is hint:
            return value
        raise TypeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise TypeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _describe(hint: Any) -> str:
    names = []
    for option in get_args(hint):
        if option is type(None):
            names.append("null")
        elif get_origin(option) is Literal:
            names.extend(repr(a) for a in get_args(option))
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def _plain(value: Any) -> Any:
    if isinstance(value, Targets):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
