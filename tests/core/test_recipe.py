from __future__ import annotations

import json

import pytest

import slimline as sl
from slimline.core.registry import config_type, registered


def test_round_trip_dict_exact() -> None:
    data = {"steps": [
        {"method": "magnitude", "sparsity": 0.3, "targets": {"include": ["fc*"]}},
        {"method": "half", "dtype": "float16"},
        {"method": "compile"},
    ]}
    recipe = sl.Recipe.from_dict(data)
    again = sl.Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()
    assert recipe.steps[0].targets.include == ("fc*",)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_file(tmp_path, suffix: str) -> None:
    recipe = sl.Recipe.from_dict({"steps": [{"method": "magnitude", "pattern": "2:4"}]})
    path = tmp_path / f"r{suffix}"
    recipe.to_file(path)
    assert sl.Recipe.from_file(path) == recipe


def test_every_method_default_round_trips() -> None:
    for cls in registered():
        cfg = cls()
        assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"method": "nope"}], "unknown method 'nope'"),
        ([{"method": "magnitude", "sparsity": 1.0}], "magnitude.sparsity"),
        ([{"method": "magnitude", "sparsity": -0.1}], "magnitude.sparsity"),
        ([{"method": "magnitude", "spars": 0.5}], "unknown field(s) spars"),
        ([{"method": "magnitude", "pattern": "4:2"}], "magnitude.pattern"),
        ([{"method": "half", "dtype": "float8"}], "half.dtype"),
        ([{"method": "compile"}, {"method": "magnitude"}], "must come before step 0 (compile)"),
        ([{"method": "half"}, {"method": "magnitude"}], "must come before"),
        ([{"method": "half"}, {"method": "half"}], "second cast step"),
        ([{"sparsity": 0.5}], "'method' key"),
    ],
)
def test_bad_recipes_name_the_problem(steps, message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        sl.Recipe.from_dict({"steps": steps})
    assert message in str(info.value)


def test_wrong_type_is_type_error() -> None:
    with pytest.raises(TypeError, match="magnitude.sparsity: expected a number"):
        sl.Recipe.from_dict({"steps": [{"method": "magnitude", "sparsity": "half"}]})
    with pytest.raises(TypeError, match="half.keep_norms: expected bool"):
        sl.Recipe.from_dict({"steps": [{"method": "half", "keep_norms": 1}]})


def test_config_type_by_name() -> None:
    assert config_type("magnitude").method == "magnitude"
    with pytest.raises(ValueError, match="known methods"):
        config_type("gptqq")


def test_missing_recipe_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        sl.Recipe.from_file(tmp_path / "missing.yaml")
