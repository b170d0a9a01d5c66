from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import slimline as sl
from slimline.core import registry
from slimline.core.config import MethodConfig
from slimline.core.families import Family


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_input_model_not_mutated(tiny_mlp) -> None:
    before = _state(tiny_mlp)
    result = sl.compress(tiny_mlp, {"steps": [{"method": "magnitude", "sparsity": 0.5}]})
    assert result.model is not tiny_mlp
    for k, v in tiny_mlp.state_dict().items():
        assert torch.equal(v, before[k])
    assert (result.model.fc1.weight == 0).any()
    assert result.steps[0].method == "magnitude"
    assert result.steps[0].modules == ["fc1", "fc2"]


def test_inplace_mutates(tiny_mlp) -> None:
    result = sl.compress(tiny_mlp, {"steps": [{"method": "magnitude"}]}, inplace=True)
    assert result.model is tiny_mlp
    assert (tiny_mlp.fc1.weight == 0).any()


def test_nan_weights_named_before_anything(tiny_mlp) -> None:
    with torch.no_grad():
        tiny_mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc2.weight' contains NaN"):
        sl.compress(tiny_mlp, {"steps": [{"method": "magnitude"}]}, inplace=True)
    assert not (tiny_mlp.fc1.weight == 0).any()


def test_bad_target_raises_before_touching(tiny_mlp) -> None:
    before = _state(tiny_mlp)
    recipe = {"steps": [
        {"method": "magnitude"},
        {"method": "magnitude", "targets": {"include": ["nowhere.*"]}},
    ]}
    with pytest.raises(ValueError, match=r"recipe step 1 \(magnitude\).*matches no module"):
        sl.compress(tiny_mlp, recipe, inplace=True)
    for k, v in tiny_mlp.state_dict().items():
        assert torch.equal(v, before[k])


def test_nm_width_checked_before_touching(tiny_mlp) -> None:
    recipe = {"steps": [{"method": "magnitude", "pattern": "2:3"}]}
    with pytest.raises(ValueError, match="not divisible by 3"):
        sl.compress(tiny_mlp, recipe, inplace=True)
    assert not (tiny_mlp.fc1.weight == 0).any()


def test_calibration_nan_named(tiny_mlp) -> None:
    bad = [torch.full((2, 32), float("nan"))]
    with pytest.raises(ValueError, match=r"calibration\[0\]: contains NaN"):
        sl.compress(tiny_mlp, {"steps": [{"method": "magnitude"}]}, calibration=bad)


def test_recipe_recorded_and_accumulates(tiny_mlp) -> None:
    first = sl.compress(tiny_mlp, {"steps": [{"method": "magnitude", "sparsity": 0.2}]}).model
    second = sl.compress(first, {"steps": [{"method": "half"}]}).model
    steps = second.slimline_recipe["steps"]
    assert [s["method"] for s in steps] == ["magnitude", "half"]


def test_list_methods_rows() -> None:
    rows = {r["method"]: r for r in sl.list_methods()}
    assert {"magnitude", "half", "compile"} <= set(rows)
    assert rows["magnitude"]["family"] == "prune"
    assert "sparsity" in rows["magnitude"]["fields"]


def test_missing_calibration_named(tiny_mlp) -> None:
    @dataclass(frozen=True, kw_only=True)
    class NeedsDataConfig(MethodConfig):
        method: ClassVar[str] = "needs_data_test"
        family: ClassVar[Family] = Family.PRUNE
        needs_calibration: ClassVar[bool] = True

    @registry.register(NeedsDataConfig)
    def apply(model, cfg, ctx):  # pragma: no cover - never reached
        raise AssertionError("must not run")

    try:
        with pytest.raises(ValueError, match="'needs_data_test' needs calibration data"):
            sl.compress(tiny_mlp, {"steps": [{"method": "needs_data_test"}]})
        with pytest.raises(ValueError, match="calibration data is empty"):
            sl.compress(tiny_mlp, {"steps": [{"method": "needs_data_test"}]}, calibration=[])
    finally:
        registry._HANDLERS.pop(NeedsDataConfig)
        registry._BY_NAME.pop("needs_data_test")


def test_a_list_of_step_dicts_is_a_recipe(tiny_mlp) -> None:
    steps = [{"method": "magnitude", "sparsity": 0.5}]
    from_list = sl.compress(tiny_mlp, steps).model
    from_dict = sl.compress(tiny_mlp, {"steps": steps}).model
    for a, b in zip(from_list.state_dict().values(), from_dict.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sparsity"):
        sl.compress(tiny_mlp, [{"method": "magnitude", "sparsity": 2.0}])
