"""Factor layers compose (issue 12, item 6): the later steps of a recipe see two ordinary Linear
layers per factorized layer — pruners mask them, quantizers pack them, distillation and LoRA
train them — and every result saves and loads exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.factorize.layers import LowRankLinear, TuckerConv2d


def _logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def _factors(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers, "nothing was factorized"
    return [f for m in layers for f in (m.first, m.second)]


@pytest.mark.parametrize(("steps", "kind"), [
    ([{"method": "svd_llm", "ratio": 0.5}, {"method": "wanda", "sparsity": 0.5}], "pruned"),
    ([{"method": "svd", "ratio": 0.5}, {"method": "magnitude", "sparsity": 0.5}], "pruned"),
    ([{"method": "asvd", "ratio": 0.5}, {"method": "rtn", "bits": 4, "group_size": 16}],
     "QuantLinear"),
    ([{"method": "svd_llm", "ratio": 0.5}, {"method": "gptq", "bits": 4, "group_size": 16}],
     "QuantLinear"),
])
def test_factors_are_pruned_or_quantized_and_reload_exactly(
    steps: list[dict[str, Any]], kind: str, tiny_llama, token_batches, tmp_path
) -> None:
    result = sl.compress(tiny_llama, {"steps": steps}, calibration=token_batches)
    assert result.steps[1].modules  # the second step found layers to work on
    for factor in _factors(result.model):
        if kind == "pruned":  # 50% of every factor's weights, per output row for wanda
            assert isinstance(factor, nn.Linear)
            assert float((factor.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        else:
            assert type(factor).__name__ == kind
    sl.save(result.model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    assert torch.equal(_logits(loaded, token_batches), _logits(result.model, token_batches))
    assert [type(f) for f in _factors(loaded)] == [type(f) for f in _factors(result.model)]


def _kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                            log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("recover", [
    {"method": "distill", "steps": 8, "lr": 1e-3},
    {"method": "distill", "steps": 8, "lr": 1e-2, "trainable": "lora"},
])
def test_factors_are_recovered_by_distillation(
    recover: dict[str, Any], tiny_llama, token_batches, tmp_path
) -> None:
    factorize = {"method": "svd", "ratio": 0.3}
    dense = _logits(tiny_llama, token_batches)
    before = sl.compress(tiny_llama, {"steps": [factorize]}).model
    result = sl.compress(tiny_llama, {"steps": [factorize, recover]}, calibration=token_batches)
    ranks = [m.rank for m in result.model.modules() if isinstance(m, LowRankLinear)]
    assert ranks == [m.rank for m in before.modules() if isinstance(m, LowRankLinear)]
    assert all(type(f) is nn.Linear for f in _factors(result.model))  # adapters merged
    assert _kl_to(dense, _logits(result.model, token_batches)) \
        < _kl_to(dense, _logits(before, token_batches))
    sl.save(result.model, tmp_path / "ck")
    assert torch.equal(_logits(sl.load(tmp_path / "ck"), token_batches),
                       _logits(result.model, token_batches))


def test_tucker_layers_are_cast_and_reload_exactly(tmp_path) -> None:
    from slimline.models import load_builtin

    built = load_builtin("digits-cnn")
    steps = [{"method": "tucker", "ratio": 0.5}, {"method": "half", "dtype": "bfloat16"}]
    out = sl.compress(built.model, {"steps": steps}).model
    convs = [m for m in out.modules() if isinstance(m, TuckerConv2d)]
    assert convs and all(c.core.weight.dtype == torch.bfloat16 for c in convs)
    sl.save(out, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    images = built.batches("test", batch_size=8, limit=1)[0]["pixel_values"]
    with torch.no_grad():
        assert torch.equal(loaded(images.bfloat16()), out(images.bfloat16()))
    assert all(c.core.weight.dtype == torch.bfloat16
               for c in loaded.modules() if isinstance(c, TuckerConv2d))
