"""The search space: declared ranges, sampling that obeys the family rules, space files."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from slimline.core.families import Family
from slimline.core.registry import config_type, registered
from slimline.search.ranges import Choice, FloatRange, IntRange
from slimline.search.space import build_space, declared_space


class _Net(torch.nn.Module):
    """A conv layer, two hidden Linear layers and a head: every family but structure/cache."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _grid_points(searchable: Choice | IntRange | FloatRange) -> list[object]:
    if isinstance(searchable, Choice):
        return list(searchable.values)
    return [searchable.low, searchable.high]


def test_every_declared_space_builds_its_config_at_every_choice_and_range_end() -> None:
    declared = {c.method: declared_space(c) for c in registered()}
    searchable = {name for name, space in declared.items() if space is not None}
    assert {"rtn", "gptq", "wanda", "magnitude", "svd", "kv_cache", "qat"} <= searchable
    for name in searchable:
        config = config_type(name)
        for field, values in (declared[name] or {}).items():
            for value in _grid_points(values):
                assert getattr(config(**{field: value}), field) == value


def _recipes(space_kwargs: dict[str, object], n: int) -> list[tuple[object, dict[str, object]]]:
    """``n`` recipes sampled by Optuna's random sampler, with the params it chose."""
    space = build_space(_Net(), **space_kwargs)  # type: ignore[arg-type]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((space.sample(trial), dict(trial.params)))
        study.tell(trial, 0.0)
    return out


def test_sampled_recipes_obey_the_family_rules_and_the_declared_ranges() -> None:
    families = list(Family)
    seen_methods = set()
    for recipe, _params in _recipes({"calibration": True, "training": False}, 300):
        steps = list(recipe)
        seen_methods |= {s.method for s in steps}
        ranks = [s.family.rule.rank for s in steps]
        assert ranks == sorted(ranks)  # prune before quantize, cast after, ...
        once = [s.family for s in steps if s.family.rule.once]
        assert len(once) == len(set(once))
        for step in steps:
            assert step.family in families
            for field, searchable in (declared_space(type(step)) or {}).items():
                assert searchable.contains(getattr(step, field)), (step.method, field)
            assert not step.needs_training
    # the random sampler reaches methods of every family the model allows
    assert {"magnitude", "wanda", "svd", "tucker", "rtn", "gptq", "half"} <= seen_methods
    assert not seen_methods & {"qat", "kv_cache", "structured", "layer_drop"}


def test_training_and_calibration_methods_are_left_out_unless_their_data_is_given() -> None:
    plain = build_space(_Net(), calibration=False, training=False)
    names = {m.method for m in plain.methods}
    assert "qat" not in names and "wanda" not in names and "gptq" not in names
    assert "trains" in plain.excluded["qat"] and "calibration" in plain.excluded["wanda"]
    full = build_space(_Net(), calibration=True, training=True)
    assert {"qat", "wanda", "gptq"} <= {m.method for m in full.methods}


def test_a_space_file_narrows_methods_and_ranges(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("methods:\n"
                    "  rtn: {bits: [4, 8], group_size: 64}\n"
                    "  magnitude: {sparsity: {low: 0.3, high: 0.4}}\n")
    space = build_space(_Net(), calibration=False, training=False, spec=path)
    assert sorted(m.method for m in space.methods) == ["magnitude", "rtn"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        trial = study.ask()
        for step in space.sample(trial):
            if step.method == "rtn":
                assert step.bits in (4, 8) and step.group_size == 64
            else:
                assert 0.3 <= step.sparsity <= 0.4 + 1e-9
        study.tell(trial, 0.0)


@pytest.mark.parametrize(("spec", "message"), [
    ({"methods": {"rtn": {"bits": [2]}}}, "not among the declared"),
    ({"methods": {"magnitude": {"sparsity": {"low": 0.0, "high": 0.5}}}}, "not inside"),
    ({"methods": {"rtn": {"colour": 1}}}, "not a field of rtn"),
    ({"methods": {"rtn": {"symmetric": [True, False]}}}, "not searchable"),
    ({"methods": {"rtn": {"bits": 99}}}, "rtn.bits"),
    ({"methods": {"nope": {}}}, "unknown method 'nope'"),
    ({"methods": {"kv_cache": {}}}, "kv_cache cannot be searched here"),
    ({"methods": {"wanda": {}}}, "needs calibration"),
    ({"methods": []}, "at least one method"),
    ({"steps": []}, "one key, 'methods'"),
])
def test_bad_space_files_are_clear_errors(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_space(_Net(), calibration=False, training=False, spec=spec)


def test_a_model_nothing_applies_to_is_an_empty_space_error() -> None:
    with pytest.raises(ValueError, match="search space is empty"):
        build_space(torch.nn.Sequential(torch.nn.ReLU()), calibration=True, training=True)


def test_single_methods_are_each_method_alone_at_its_defaults() -> None:
    space = build_space(_Net(), calibration=True, training=False)
    singles = space.single_methods()
    assert len(singles) == len(space.methods)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for params in singles:
        study.enqueue_trial(params)
        trial = study.ask()
        recipe = list(space.sample(trial))
        study.tell(trial, 0.0)
        assert len(recipe) == 1, params
        step = recipe[0]
        defaults = config_type(step.method)()
        for field, searchable in (declared_space(type(step)) or {}).items():
            if searchable.contains(getattr(defaults, field)):  # a default outside is sampled
                assert getattr(step, field) == getattr(defaults, field), (step.method, field)
    assert [p[s.config.family.label] for p, s in zip(singles, [
        m for _, ms in space.slots() for m in ms], strict=True)] == [
        m.method for _, ms in space.slots() for m in ms]
