"""``lora``: parameter counts against ``peft``, merge exactness, the task loss, QLoRA, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimline as sl
from slimline.core.registry import StepContext
from slimline.peft.layer import LoraLinear
from slimline.peft.lora import (
    LoraConfig,
    add_adapters,
    apply_lora,
    lora_loss,
    merge_adapters,
)
from slimline.quantize.qlinear import QuantLinear

# (fixture, slimline include globs, peft target_modules)
MODELS = [
    ("tiny_llama", ["*.q_proj", "*.v_proj"], ["q_proj", "v_proj"]),
    ("tiny_llama", [], "all-linear"),
    ("tiny_gpt2", ["*.c_attn", "*.c_fc"], ["c_attn", "c_fc"]),
    ("tiny_bert", ["*.query", "*.value", "*.intermediate.dense"],
     ["query", "value", "intermediate.dense"]),
]


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize(("fixture", "include", "peft_targets"), MODELS)
def test_trainable_parameter_count_equals_peft(
    request: pytest.FixtureRequest, fixture: str, include: list[str], peft_targets: object,
    variant: str,
) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = request.getfixturevalue(fixture)
    reference = get_peft_model(copy.deepcopy(model), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, use_dora=variant == "dora"))
    cfg = LoraConfig.from_dict({"r": 4, "alpha": 8.0, "variant": variant,
                                "targets": {"include": include}})
    adapters = add_adapters(model, cfg)
    assert adapters
    assert _trainable(model) == reference.get_nb_trainable_parameters()[0]
    assert sorted(adapters) == sorted(
        n.removeprefix("base_model.model.") for n, m in reference.named_modules()
        if type(m).__name__ in {"Linear"} and hasattr(m, "lora_A")
    )


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_merged_equals_unmerged_after_training(
    request: pytest.FixtureRequest, token_batches: list, fixture: str, variant: str
) -> None:
    model = request.getfixturevalue(fixture)
    recipe = [LoraConfig(r=4, variant=variant, steps=4, lr=1e-2)]
    trained = sl.compress(model, recipe, training=token_batches).model
    adapters = [m for m in trained.modules() if isinstance(m, LoraLinear)]
    assert adapters and all(m.lora_B.weight.abs().max() > 0 for m in adapters)  # trained
    unmerged = _logits(trained, token_batches[0])
    assert not torch.allclose(unmerged, _logits(model, token_batches[0]), atol=1e-4)
    weights = {n: m.base_layer.weight for n, m in trained.named_modules()
               if isinstance(m, LoraLinear)}  # fmt: skip
    report = merge_adapters(trained)
    assert len(report.merged) == len(adapters) and not report.kept
    assert all(trained.get_submodule(n).weight is w for n, w in weights.items())  # in place
    assert not any(isinstance(m, LoraLinear) for m in trained.modules())
    torch.testing.assert_close(_logits(trained, token_batches[0]), unmerged, rtol=0, atol=1e-5)
    merged_step = sl.compress(model, [LoraConfig(r=4, variant=variant, steps=4, lr=1e-2,
                                                 merge=True)], training=token_batches).model
    torch.testing.assert_close(_logits(merged_step, token_batches[0]), unmerged,
                               rtol=0, atol=1e-5)  # fmt: skip


def test_causal_lm_loss_masks_padding(tiny_llama: torch.nn.Module) -> None:
    """The loss is the mean next-token cross-entropy over real tokens only (brute force)."""
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    logits = _logits(tiny_llama, batch)
    terms = [F.cross_entropy(logits[b, t], ids[b, t + 1])
             for b in range(2) for t in range(9) if mask[b, t + 1]]  # fmt: skip
    with torch.no_grad():
        loss = lora_loss(tiny_llama, batch)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_training_lowers_the_task_loss(tiny_llama: torch.nn.Module, token_batches: list) -> None:
    def mean_loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum(float(lora_loss(model, b)) for b in token_batches) / len(token_batches)

    before = mean_loss(tiny_llama)
    trained = sl.compress(tiny_llama, [LoraConfig(steps=8, lr=2e-2)], training=token_batches)
    assert mean_loss(trained.model) < before - 0.1
    trainable = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # as peft leaves it


def test_sequence_classifier_trains_on_labels(tiny_bert: torch.nn.Module,
                                              labelled_batches: list) -> None:
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    result = sl.compress(tiny_bert, [LoraConfig(steps=4, lr=1e-2)], training=labelled_batches)
    assert "task loss" in result.steps[0].notes[1]
    for name, module in result.model.named_modules():  # the base layers are unchanged
        if isinstance(module, LoraLinear):
            torch.testing.assert_close(module.base_layer.weight, before[f"{name}.weight"],
                                       rtol=0, atol=0)  # fmt: skip


# --- QLoRA ----------------------------------------------------------------------------------


def _qlora(model: torch.nn.Module, batches: list, **lora: object) -> torch.nn.Module:
    recipe = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32},
                        {"method": "lora", "r": 4, "steps": 4, "lr": 1e-2, **lora}]}
    return sl.compress(model, recipe, training=batches, calibration=batches).model


def test_qlora_keeps_the_base_packed_and_frozen(tiny_llama: torch.nn.Module,
                                                token_batches: list) -> None:
    quantized = sl.compress(tiny_llama, {"steps": [{"method": "rtn", "bits": 4,
                                                    "group_size": 32}]}).model  # fmt: skip
    packed = {k: v.clone() for k, v in quantized.state_dict().items()}
    model = sl.compress(quantized, [LoraConfig(r=4, steps=4, lr=1e-2)],
                        training=token_batches).model  # fmt: skip
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert adapters and all(isinstance(m.base_layer, QuantLinear) for m in adapters.values())
    for name, adapter in adapters.items():
        assert adapter.lora_A.weight.dtype == torch.float32
        assert adapter.lora_B.weight.abs().max() > 0
        for key, value in adapter.base_layer.state_dict().items():
            assert torch.equal(value, packed[f"{name}.{key}"]), (name, key)
    kept = copy.deepcopy(model)
    report = merge_adapters(kept, quantized="keep")
    assert sorted(report.kept) == sorted(adapters) and not report.merged
    torch.testing.assert_close(_logits(kept, token_batches[0]), _logits(model, token_batches[0]),
                               rtol=0, atol=0)  # fmt: skip


def test_qlora_requantized_merge_rounds_to_nearest_and_reports_its_error(
    tiny_llama: torch.nn.Module, token_batches: list
) -> None:
    model = _qlora(tiny_llama, token_batches, variant="dora")
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    exact = {n: m.adapted_weight().detach() for n, m in adapters.items()}
    unmerged = _logits(model, token_batches[0])
    report = merge_adapters(model, quantized="requantize")
    assert sorted(report.requantized) == sorted(adapters)
    for name, target in exact.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.bits == 4 and layer.group_size == 32
        got = layer.dequantized_weight()
        # Brute force: every weight is the nearest of its group's 16 grid values.
        s = layer.scales.float().repeat_interleave(32, dim=1)  # (N, K)
        z = layer.zero_points().float().repeat_interleave(32, dim=1)
        grid = (torch.arange(16).view(1, 1, 16) - z.unsqueeze(-1)) * s.unsqueeze(-1)
        nearest = (grid - target.unsqueeze(-1)).abs().min(dim=-1).values
        torch.testing.assert_close((got - target).abs(), nearest, rtol=0, atol=1e-6)
        error = float((got - target).norm() / target.norm())
        assert report.requantized[name] == pytest.approx(error, rel=1e-5)
    merged = _logits(model, token_batches[0])
    output_error = float((merged - unmerged).norm() / unmerged.norm())
    assert 0 < output_error < 1  # re-quantization adds a real, bounded error

    step = _qlora(tiny_llama, token_batches, variant="dora", merge=True,
                  merge_quantized="requantize")  # fmt: skip
    assert not any(isinstance(m, LoraLinear) for m in step.modules())


# --- bad input -------------------------------------------------------------------------------


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("step", "match"), [
    ({"r": 0}, r"lora\.r: must be ≥ 1"),
    ({"alpha": 0}, r"lora\.alpha"),
    ({"dropout": 1.0}, r"lora\.dropout"),
    ({"targets": {"include": ["*.no_such_layer"]}}, "matches no module"),
    ({"targets": {"include": ["*.input_layernorm"]}}, "matches only LlamaRMSNorm"),
])
def test_bad_config_raises_before_training(tiny_llama: torch.nn.Module, token_batches: list,
                                           step: dict, match: str) -> None:
    before = _state(tiny_llama)
    with pytest.raises(ValueError, match=match):
        sl.compress(tiny_llama, {"steps": [{"method": "lora", **step}]}, training=token_batches,
                    inplace=True)  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


def test_bad_data_raises_before_training(tiny_llama: torch.nn.Module, tiny_mlp: torch.nn.Module,
                                         token_batches: list) -> None:
    with pytest.raises(ValueError, match="needs training data"):
        sl.compress(tiny_llama, [LoraConfig()])
    with pytest.raises(ValueError, match="needs training data"):
        apply_lora(tiny_llama, LoraConfig(), StepContext())
    nan = dict(token_batches[0], inputs_scale=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"training\[1\]: contains NaN"):
        sl.compress(tiny_llama, [LoraConfig()], training=[token_batches[0], nan])
    with pytest.raises(ValueError, match=r"lora training\[0\]: contains NaN"):
        apply_lora(tiny_llama, LoraConfig(), StepContext(training=[nan]))
    with pytest.raises(ValueError, match=r"training\[0\] has no 'labels'"):
        sl.compress(tiny_mlp, [LoraConfig()], training=[torch.randn(4, 32)])
    assert not any(isinstance(m, LoraLinear) for m in tiny_llama.modules())


def test_encoder_without_head_is_refused(tiny_llama: torch.nn.Module, token_batches: list) -> None:
    with pytest.raises(ValueError, match=r"\(lora\): LlamaModel has no task head"):
        sl.compress(tiny_llama.model, [LoraConfig()], training=token_batches)
    assert add_adapters(tiny_llama.model, LoraConfig())  # other steps may still adapt it


def test_failure_during_training_restores_the_model(
    tiny_llama: torch.nn.Module, token_batches: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimline.peft.lora as lora

    def boom(*args: object, **kwargs: object) -> list[float]:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(lora, "train_loop", boom)
    before = _state(tiny_llama)
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    with pytest.raises(RuntimeError, match="interrupted"):
        apply_lora(tiny_llama, LoraConfig(), StepContext(training=token_batches))
    assert not any(isinstance(m, LoraLinear) for m in tiny_llama.modules())
    assert _state(tiny_llama).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags


def test_batch_size_recuts_rows(tiny_llama: torch.nn.Module, token_batches: list,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import slimline.peft.lora as lora

    seen: list[int] = []
    original = lora_loss

    def counting(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        seen.append(batch["input_ids"].shape[0])
        return original(model, batch)

    monkeypatch.setattr(lora, "lora_loss", counting)
    sl.compress(tiny_llama, [LoraConfig(steps=4, batch_size=4)], training=token_batches)
    assert sorted(set(seen)) == [2, 4]  # 6 rows re-cut as 4 + 2
    with pytest.raises(ValueError, match="lora.batch_size"):
        uneven = [token_batches[0], {k: v[:, :8] for k, v in token_batches[1].items()}]
        sl.compress(tiny_llama, [LoraConfig(batch_size=4)], training=uneven)


# --- a pruned base -------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_masked_adapter_computes_and_merges_the_masked_weight(dora: bool) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 12)
    with torch.no_grad():
        base.weight.mul_(torch.rand(12, 16, generator=g) > 0.5)  # half pruned
    mask = base.weight.detach() != 0
    layer = LoraLinear(base, r=3, alpha=6.0, dora=dora, weight_mask=mask)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(12, 3, generator=g))
    x = torch.randn(5, 16, generator=g)
    # Reference: the layer computes with (W + s·BA) ⊙ M (DoRA: each row rescaled to m).
    w = (base.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight) * mask
    if dora:
        w = (layer.lora_magnitude_vector / w.norm(dim=1)).unsqueeze(1) * w
    with torch.no_grad():
        unmerged = layer(x)
        torch.testing.assert_close(unmerged, F.linear(x, w, base.bias), rtol=0, atol=1e-5)
        rebuilt = LoraLinear.from_slimline_meta(layer.slimline_meta())  # checkpoint path
        rebuilt.load_state_dict(layer.state_dict(), assign=True)
        torch.testing.assert_close(rebuilt(x), unmerged, rtol=0, atol=0)
        model = torch.nn.Sequential(layer)
        merge_adapters(model)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    assert torch.equal(model[0].weight == 0, ~mask)  # exactly the pruned zeros


def test_loop_options_reach_the_lora_step(tiny_llama: torch.nn.Module,
                                          token_batches: list) -> None:
    cfg = LoraConfig(steps=3, accumulation=2, eval_fraction=0.34, max_grad_norm=None)
    assert (LoraConfig().steps, LoraConfig().lr) == (16, 1e-3)  # its own defaults
    result = sl.compress(tiny_llama, [cfg], training=token_batches)
    assert f"on {len(token_batches) - 1} batches, 1 held out" in result.steps[0].notes[1]
    with pytest.raises(ValueError, match="lora.accumulation"):
        LoraConfig(accumulation=0)
