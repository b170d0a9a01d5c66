"""A recipe: an ordered list of validated method configs, from dict/YAML/JSON and back."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimline.core.config import MethodConfig
from slimline.core.registry import config_type

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Ordered compression steps, checked against the family rules at construction."""

    steps: tuple[MethodConfig, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        for i, step in enumerate(steps):
            if not isinstance(step, MethodConfig):
                raise TypeError(f"step {i}: expected a method config, got {type(step).__name__}")
        object.__setattr__(self, "steps", steps)
        check_order(steps)

    def __iter__(self) -> Iterator[MethodConfig]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """``{"steps": [{"method": "rtn", "bits": 4}, ...]}``; errors name the step."""
        if not isinstance(data, dict):
            raise TypeError(f"a recipe must be a mapping with 'steps', got {type(data).__name__}")
        unknown = set(data) - {"steps", "version"}
        if unknown:
            raise ValueError(f"recipe: unknown key(s) {sorted(unknown)}; expected 'steps'")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"recipe: version {version!r} is not supported ({FORMAT_VERSION})")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list):
            raise ValueError("recipe: 'steps' must be a list of step mappings")
        steps = []
        for i, raw in enumerate(raw_steps):
            if not isinstance(raw, dict) or "method" not in raw:
                raise ValueError(f"recipe step {i}: must be a mapping with a 'method' key")
            try:
                steps.append(config_type(raw["method"]).from_dict(raw))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"recipe step {i}: {exc}") from None
        return cls(tuple(steps))

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a ``.yaml``/``.yml`` or ``.json`` recipe file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"recipe file {str(path)!r}: use a .yaml, .yml or .json file")
        return cls.from_dict(data)

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def needs_calibration(self) -> bool:
        return any(s.requires_calibration() for s in self.steps)


def check_order(steps: Sequence[MethodConfig]) -> None:
    """Apply the family rules (``core/families.py``): rank order and at-most-once families."""
    seen: dict[object, int] = {}
    for i, step in enumerate(steps):
        rule = step.family.rule
        if rule.once and step.family in seen:
            raise ValueError(
                f"recipe step {i} ({step.method}): a second {step.family.label} step "
                f"(first at step {seen[step.family]}); {rule.why}"
            )
        seen.setdefault(step.family, i)
        for j in range(i):
            earlier = steps[j]
            if earlier.family.rule.rank > rule.rank:
                raise ValueError(
                    f"recipe step {i} ({step.method}) must come before step {j} "
                    f"({earlier.method}): {earlier.family.rule.why}"
                )
