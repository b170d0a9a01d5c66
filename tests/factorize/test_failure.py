"""A factorization that fails halfway leaves an ``inplace=True`` model as it was: the layers
already replaced are put back (the very same modules), whatever raised."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.factorize.layers import LowRankLinear, TuckerConv2d


def _snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    modules = dict(model.named_modules())
    return modules, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: tuple[dict[str, nn.Module], dict[str, Any]]) -> None:
    modules, state = before
    now = dict(model.named_modules())
    assert now.keys() == modules.keys()
    assert all(now[n] is m for n, m in modules.items())  # the same objects, not copies
    assert not any(isinstance(m, (LowRankLinear, TuckerConv2d)) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", ["svd_llm", "asvd"])
def test_a_layer_raising_in_a_later_block_rolls_back(method: str, tiny_llama, token_batches) -> None:
    model = tiny_llama
    before = _snapshot(model)
    seen_factorized: list[bool] = []

    def fail(_module: nn.Module, _args: Any) -> None:
        first_block = model.model.layers[0].mlp.down_proj
        seen_factorized.append(isinstance(first_block, LowRankLinear))
        raise RuntimeError("boom in block 1")

    # Block 1 runs after block 0 was factorized (svd, which runs no data, fails below).
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            sl.compress(model, {"steps": [{"method": method, "ratio": 0.5}]},
                        calibration=token_batches, inplace=True)
    finally:
        handle.remove()
    assert seen_factorized == [True]  # it did fail halfway, with block 0 replaced
    _assert_unchanged(model, before)


def test_a_failing_decomposition_rolls_back(tiny_llama, monkeypatch) -> None:
    import slimline.factorize.svd as svd_module

    calls = {"n": 0}
    real = svd_module.svd_of

    def flaky(weight: torch.Tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise FloatingPointError("SVD did not converge")
        return real(weight)

    monkeypatch.setattr(svd_module, "svd_of", flaky)
    before = _snapshot(tiny_llama)
    with pytest.raises(FloatingPointError):
        sl.compress(tiny_llama, {"steps": [{"method": "svd", "ratio": 0.5}]}, inplace=True)
    assert calls["n"] == 5  # four layers were replaced before the fifth failed
    _assert_unchanged(tiny_llama, before)


def test_a_failing_tucker_layer_rolls_back(monkeypatch) -> None:
    import slimline.factorize.tucker as tucker_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    real = tucker_module.tucker2

    def flaky(weight: torch.Tensor, *args: Any, **kwargs: Any):
        if weight.shape[1] == 8:  # the second conv
            raise FloatingPointError("SVD did not converge")
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(tucker_module, "tucker2", flaky)
    before = _snapshot(model)
    with pytest.raises(FloatingPointError):
        sl.compress(model, {"steps": [{"method": "tucker", "ratio": 0.5}]}, inplace=True)
    _assert_unchanged(model, before)
