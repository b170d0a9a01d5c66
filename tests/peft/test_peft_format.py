"""Adapters saved by slimline load in the real ``peft`` package with identical outputs; an
unmerged LoRA model saves and loads exactly through ``sl.save`` / ``sl.load``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import slimline as sl
from slimline.peft.layer import LoraLinear
from slimline.peft.lora import LoraConfig
from slimline.peft.peft_format import save_adapter
from slimline.quantize.qlinear import QuantLinear

CASES = [
    ("tiny_llama", "token_batches", {"variant": "lora"}),
    ("tiny_llama", "token_batches", {"variant": "dora", "rslora": True, "r": 2, "alpha": 5.0}),
    ("tiny_gpt2", "token_batches", {"variant": "lora", "dropout": 0.1}),
    ("tiny_gpt2", "token_batches", {"variant": "dora"}),
    ("tiny_bert", "labelled_batches", {"variant": "dora",
                                       "targets": {"include": ["*.query", "*.value"]}}),
]


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _trained(request: pytest.FixtureRequest, fixture: str, data: str, step: dict):
    model, batches = request.getfixturevalue(fixture), request.getfixturevalue(data)
    cfg = LoraConfig.from_dict({"r": 4, "steps": 3, "lr": 1e-2, **step})
    return model, batches, sl.compress(model, [cfg], training=batches).model


@pytest.mark.parametrize(("fixture", "data", "step"), CASES)
def test_saved_adapter_loads_in_peft_with_identical_outputs(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, data: str, step: dict
) -> None:
    from peft import PeftModel

    base, batches, adapted = _trained(request, fixture, data, step)
    save_adapter(adapted, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (step["variant"] == "dora")
    assert config["fan_in_fan_out"] == (fixture == "tiny_gpt2")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ours = {n: m for n, m in adapted.named_modules() if isinstance(m, LoraLinear)}
    theirs = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
              if hasattr(m, "lora_A") and hasattr(m, "base_layer")}  # fmt: skip
    assert sorted(theirs) == sorted(ours)
    for name, layer in ours.items():
        assert theirs[name].scaling["default"] == pytest.approx(layer.scaling)
    for batch in batches:
        expected = _logits(adapted, batch)
        assert not torch.allclose(expected, _logits(base, batch), atol=1e-4)  # adapters matter
        torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=1e-6)


def test_save_adapter_refuses_a_model_without_adapters(tiny_llama: torch.nn.Module,
                                                       tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(tiny_llama, tmp_path / "adapter")


@pytest.mark.parametrize(("fixture", "data", "step"), CASES[:4])
def test_unmerged_model_saves_and_loads_exactly(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, data: str, step: dict
) -> None:
    _, batches, adapted = _trained(request, fixture, data, step)
    adapted.eval()
    sl.save(adapted, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, LoraLinear)) == sorted(
        n for n, m in adapted.named_modules() if isinstance(m, LoraLinear))
    for batch in batches:
        torch.testing.assert_close(_logits(loaded, batch), _logits(adapted, batch),
                                   rtol=0, atol=0)  # fmt: skip


def test_qlora_model_saves_and_loads_exactly(tiny_llama: torch.nn.Module, token_batches: list,
                                             tmp_path: Path) -> None:
    recipe = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32},
                        {"method": "lora", "variant": "dora", "steps": 3, "lr": 1e-2}]}
    adapted = sl.compress(tiny_llama, recipe, calibration=token_batches).model
    sl.save(adapted, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "recipe.json").read_text())
    assert {m["type"] for m in manifest["modules"].values()} == {"LoraLinear"}  # outermost only
    loaded = sl.load(tmp_path / "ck")
    bases = [m.base_layer for m in loaded.modules() if isinstance(m, LoraLinear)]
    assert bases and all(isinstance(b, QuantLinear) for b in bases)
    for batch in token_batches:
        torch.testing.assert_close(_logits(loaded, batch), _logits(adapted, batch),
                                   rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize(("fixture", "targets", "dora"), [
    ("tiny_llama", ["q_proj", "v_proj"], True),
    ("tiny_gpt2", r".*\.c_(attn|fc)", False),
])
def test_adapter_saved_by_peft_loads_with_identical_outputs(
    request: pytest.FixtureRequest, token_batches: list, tmp_path: Path, fixture: str,
    targets: object, dora: bool,
) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from slimline.peft.peft_format import load_adapter

    base = request.getfixturevalue(fixture)
    config = PeftLoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=dora,
                            use_rslora=True, init_lora_weights=False)  # B random: outputs move
    reference = get_peft_model(copy.deepcopy(base), config).eval()
    reference.save_pretrained(tmp_path / "adapter")
    adapters = load_adapter(base, tmp_path / "adapter")
    assert adapters
    for batch in token_batches:
        torch.testing.assert_close(_logits(base, batch), _logits(reference, batch),
                                   rtol=0, atol=1e-6)  # fmt: skip


def test_load_adapter_refuses_what_it_cannot_honour(tiny_llama: torch.nn.Module,
                                                    tmp_path: Path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from slimline.peft.peft_format import load_adapter

    config = PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    get_peft_model(copy.deepcopy(tiny_llama), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="rank_pattern"):
        load_adapter(tiny_llama, tmp_path / "adapter")
    assert not any(isinstance(m, LoraLinear) for m in tiny_llama.modules())


def test_adapter_over_a_compressed_base_loads_in_peft_on_from_pretrained(
    tiny_llama: torch.nn.Module, token_batches: list, tmp_path: Path
) -> None:
    """The recovery path users take: a pruned base saved by slimline, LoRA trained on it, the
    adapter opened by peft on the base that transformers' from_pretrained reads."""
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    pruned = sl.compress(tiny_llama, {"steps": [{"method": "magnitude", "sparsity": 0.5}]})
    base_dir = sl.save(pruned.model, tmp_path / "base")
    lora = {"method": "lora", "r": 4, "alpha": 8, "steps": 3, "lr": 1e-2}
    adapted = sl.compress(sl.load(base_dir), {"steps": [lora]}, training=token_batches).model
    save_adapter(adapted, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    for batch in token_batches:
        torch.testing.assert_close(_logits(loaded, batch), _logits(adapted, batch),
                                   rtol=0, atol=1e-6)


def test_a_bad_adapter_directory_raises_a_value_error_naming_the_file(
    tiny_llama: torch.nn.Module, tmp_path: Path
) -> None:
    from slimline.peft.peft_format import load_adapter

    with pytest.raises(ValueError, match="cannot read .*adapter_config.json"):
        load_adapter(tiny_llama, tmp_path / "missing")
    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cases = [
        ("{not json", "cannot read"),
        ([1, 2], "holds a list"),
        ({**good, "r": None}, "adapter_config.json: r must be an integer"),
        ({**good, "r": 2.5}, "r must be an integer"),
        ({**good, "lora_alpha": "8"}, "lora_alpha must be a number"),
        ({k: v for k, v in good.items() if k != "target_modules"}, "target_modules must be"),
        ({**good, "r": 0}, r"adapter_config.json: lora.r: must be ≥ 1"),
    ]
    for content, match in cases:
        (tmp_path / "adapter_config.json").write_text(
            content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=match):
            load_adapter(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        load_adapter(tiny_llama, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read .*adapter_model.safetensors"):
        load_adapter(tiny_llama, tmp_path)
    assert not any(isinstance(m, LoraLinear) for m in tiny_llama.modules())
