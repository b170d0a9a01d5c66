from __future__ import annotations

import json
import os

import pytest
import torch

import slimline as sl
from slimline.core import checkpoint
from tests.conftest import TinyMLP


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_plain_module_round_trip(tmp_path, tiny_mlp) -> None:
    sl.save(tiny_mlp, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "recipe.json").read_text())
    assert manifest["recipe"]["steps"] == []
    assert manifest["architecture"]["kind"] == "user"
    with pytest.raises(ValueError, match="pass an instance"):
        sl.load(tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=TinyMLP())
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), tiny_mlp(x), rtol=0, atol=0)


def test_hf_model_round_trip_without_skeleton(tmp_path, tiny_llama, token_batches) -> None:
    sl.save(tiny_llama, tmp_path / "ck")
    assert (tmp_path / "ck" / "config.json").is_file()
    loaded = sl.load(tmp_path / "ck")
    with torch.no_grad():
        a = tiny_llama(**token_batches[0]).logits
        b = loaded(**token_batches[0]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tied_weights_saved_once_and_retied(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sl.save(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "recipe.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = sl.load(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_is_atomic_and_replaces(tmp_path, tiny_mlp, monkeypatch) -> None:
    target = tmp_path / "ck"
    sl.save(tiny_mlp, target)
    first = (target / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_write", broken)
    with pytest.raises(RuntimeError):
        sl.save(TinyMLP(), target)
    assert (target / "model.safetensors").read_bytes() == first  # previous save intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left behind
    monkeypatch.undo()
    other = TinyMLP()
    sl.save(other, target)
    assert (target / "model.safetensors").read_bytes() != first


def test_compressed_model_saves_recipe_and_zeros(tmp_path, tiny_mlp) -> None:
    result = sl.compress(tiny_mlp, {"steps": [{"method": "magnitude", "sparsity": 0.5}]})
    sl.save(result.model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "recipe.json").read_text())
    assert [s["method"] for s in manifest["recipe"]["steps"]] == ["magnitude"]
    loaded = sl.load(tmp_path / "ck", model=TinyMLP())
    zeros = (loaded.fc1.weight == 0).float().mean().item()
    assert zeros == pytest.approx(0.5, abs=1 / loaded.fc1.weight.numel())
    assert _dir_bytes(tmp_path / "ck") > 0


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        sl.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no recipe.json"):
        sl.load(tmp_path / "empty")


def test_no_pickle_in_checkpoint(tmp_path, tiny_mlp) -> None:
    sl.save(tiny_mlp, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors", "recipe.json"]
