"""The values a method's field may take in a recipe search: a choice, or an int/float range.

Each method config declares its searchable fields next to its own fields, as a ``ClassVar``::

    search_space: ClassVar[SearchSpace] = {"bits": Choice(4, 8), "sparsity": FloatRange(0.2, 0.7)}

so the search space grows with the registry and no central list is edited when a method is
added. A YAML space file narrows a declared range (:meth:`narrow`) but never widens it.
These types are plain data: importing them does not import Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Scalar = bool | int | float | str | None


class Suggest(Protocol):
    """What an Optuna trial offers (``optuna.Trial`` satisfies it; tests may fake it)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int: ...

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...


@dataclass(frozen=True, init=False)
class Choice:
    """One of a few values (ints, floats, strings, booleans or null)."""

    values: tuple[Scalar, ...]

    def __init__(self, *values: Scalar) -> None:
        if not values:
            raise ValueError("Choice: needs at least one value")
        object.__setattr__(self, "values", tuple(values))

    def contains(self, value: object) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def sample(self, trial: Suggest, name: str) -> Scalar:
        value: Scalar = trial.suggest_categorical(name, self.values)
        return value

    def narrow(self, spec: object, where: str) -> Choice:
        """A choice of the listed values, each one of ours."""
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"{where}: give a non-empty list of values from {list(self.values)}")
        outside = [v for v in spec if not self.contains(v)]
        if outside:
            raise ValueError(f"{where}: {outside} not among the declared {list(self.values)}")
        return Choice(*spec)

    def describe(self) -> str:
        return " | ".join("null" if v is None else str(v) for v in self.values)


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[low, high]`` on a grid of ``step`` (log-uniform when ``log``)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        _check_bounds(self.low, self.high, self.log, "IntRange")
        if self.step < 1 or (self.log and self.step != 1):
            raise ValueError(f"IntRange: step must be >= 1 (and 1 when log), got {self.step}")

    def contains(self, value: object) -> bool:
        return (type(value) is int and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)

    def sample(self, trial: Suggest, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def narrow(self, spec: object, where: str) -> IntRange:
        low, high = _narrow_bounds(spec, self.low, self.high, where)
        if type(low) is not int or type(high) is not int:
            raise ValueError(f"{where}: low and high must be integers")
        return IntRange(low, high, self.step, self.log)

    def describe(self) -> str:
        return _describe_range(self.low, self.high, self.step if self.step != 1 else None,
                               self.log)


@dataclass(frozen=True)
class FloatRange:
    """A float in ``[low, high]``, continuous or on a grid of ``step`` (log when ``log``)."""

    low: float
    high: float
    step: float | None = None
    log: bool = False

    def __post_init__(self) -> None:
        _check_bounds(self.low, self.high, self.log, "FloatRange")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError(f"FloatRange: step must be > 0 and not with log, got {self.step}")

    def contains(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if not self.low - 1e-12 <= value <= self.high + 1e-12:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return math.isclose(k, round(k), abs_tol=1e-6)

    def sample(self, trial: Suggest, name: str) -> float:
        value = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        # On a grid, Optuna returns low + k·step in binary floating point (0.45000000000000007):
        # round to the grid's decimals so recipes read as written.
        return value if self.step is None else round(value, 12)

    def narrow(self, spec: object, where: str) -> FloatRange:
        low, high = _narrow_bounds(spec, self.low, self.high, where)
        return FloatRange(float(low), float(high), self.step, self.log)

    def describe(self) -> str:
        return _describe_range(self.low, self.high, self.step, self.log)


Searchable = Choice | IntRange | FloatRange
SearchSpace = Mapping[str, Searchable]


def _check_bounds(low: float, high: float, log: bool, kind: str) -> None:
    if not low <= high:
        raise ValueError(f"{kind}: low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"{kind}: a log range needs low > 0, got {low}")


def _narrow_bounds(spec: object, low: float, high: float, where: str) -> tuple[Any, Any]:
    """``{low: a, high: b}`` inside ``[low, high]`` (either key may be left out)."""
    if not isinstance(spec, Mapping) or not spec or set(spec) - {"low", "high"}:
        raise ValueError(f"{where}: give a range as {{low: ..., high: ...}} within "
                         f"[{low}, {high}], a list of values, or one value")
    new_low, new_high = spec.get("low", low), spec.get("high", high)
    for value in (new_low, new_high):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: low and high must be numbers, got {value!r}")
    if not low <= new_low <= new_high <= high:
        raise ValueError(f"{where}: [{new_low}, {new_high}] is not inside the declared "
                         f"[{low}, {high}] (low <= high)")
    return new_low, new_high


def _describe_range(low: float, high: float, step: float | None, log: bool) -> str:
    grid = f" step {step}" if step is not None else ""
    return f"[{low}, {high}]{grid}{' log' if log else ''}"
