"""The contract every registered method keeps, on every built-in model (ARCHITECTURE.md).

For each (method, model): the output shape is kept, the recipe round-trips, save → load gives
the same outputs, and invalid configs raise before the model is touched. A method whose
default targets select nothing in a model must leave it unchanged.
"""

from __future__ import annotations

import functools

import pytest
import torch

import slimline as sl
from slimline.core.batches import forward, output_tensor
from slimline.core.registry import registered
from slimline.models import load_builtin

MODELS = ("code-llama-tiny@small", "minilm", "digits-cnn")
METHODS = [c.method for c in registered()]


@functools.cache
def _builtin(spec: str):
    name, _, size = spec.partition("@")
    return load_builtin(name, size="small" if size == "small" else "full")


def _outputs(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(forward(model, batch), batch).float()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method: str, spec: str, tmp_path) -> None:
    built = _builtin(spec)
    config_cls = sl.Recipe.from_dict({"steps": [{"method": method}]}).steps[0].__class__
    recipe = sl.Recipe((config_cls(),))
    assert sl.Recipe.from_dict(recipe.to_dict()) == recipe
    batch = built.batches("test", batch_size=2, limit=1)[0]
    needs_data = recipe.needs_calibration or any(s.needs_training for s in recipe.steps)
    calibration = built.batches("train", batch_size=2, limit=2) if needs_data else None
    before = _state(built.model)
    reference = _outputs(built.model, batch)
    if not recipe.steps[0].applies_to(built.model):
        with pytest.raises(ValueError, match=method):
            sl.compress(built.model, recipe, calibration=calibration)
        for k, v in built.model.state_dict().items():
            assert torch.equal(v, before[k]), k
        return

    result = sl.compress(built.model, recipe, calibration=calibration)
    for k, v in built.model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    out = _outputs(result.model, batch)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    if not result.steps[0].modules:
        torch.testing.assert_close(out, reference, rtol=0, atol=0)

    sl.save(result.model, tmp_path / "ck", tokenizer=built.tokenizer)
    loaded = sl.load(tmp_path / "ck")
    torch.testing.assert_close(_outputs(loaded, batch), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_invalid_config_raises_before_touching(method: str) -> None:
    built = _builtin("code-llama-tiny@small")
    before = _state(built.model)
    config_cls = type(sl.Recipe.from_dict({"steps": [{"method": method}]}).steps[0])
    with pytest.raises(ValueError, match="unknown field"):
        sl.compress(built.model, {"steps": [{"method": method, "no_such_field": 1}]}, inplace=True)
    for field in config_cls.field_names():
        with pytest.raises((TypeError, ValueError), match=f"{method}.{field}"):
            sl.compress(built.model, {"steps": [{"method": method, field: {"bad": 1}}]}, inplace=True)
    for k, v in built.model.state_dict().items():
        assert torch.equal(v, before[k]), k
