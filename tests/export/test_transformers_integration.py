"""With slimline imported, transformers' from_pretrained reads what sl.save wrote, exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import slimline as sl
from slimline.core.checkpoint import RECIPE_ATTR, read_manifest

RECIPES = {
    "rtn_int4_g32": [{"method": "rtn", "bits": 4, "group_size": 32}],
    "int8_dynamic": [{"method": "int8_dynamic"}],
    "magnitude_sparse": [{"method": "magnitude", "sparsity": 0.5}],
}


def _layer_types(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_from_pretrained_equals_sl_load(tmp_path, tiny_llama, token_batches, name):
    out = sl.save(sl.compress(tiny_llama, {"steps": RECIPES[name]}).model, tmp_path / name)
    reference = sl.load(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert _layer_types(loaded) == _layer_types(reference)
    torch.testing.assert_close(loaded.state_dict(), reference.state_dict(), rtol=0, atol=0)
    for batch in token_batches:
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits,
                                       rtol=0, atol=0)
    assert getattr(loaded, RECIPE_ATTR) == read_manifest(out)["recipe"]


def test_sparse_weights_come_back_dense_with_their_zeros(tmp_path, tiny_llama):
    out = sl.save(sl.compress(tiny_llama, {"steps": RECIPES["magnitude_sparse"]}).model,
                  tmp_path / "out")
    assert read_manifest(out)["sparse"]  # the file really holds bitmask + values pairs
    weight = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj.weight
    assert float((weight == 0).float().mean()) == 0.5


def test_base_model_class_reads_a_task_model_checkpoint(tmp_path, tiny_llama, token_batches):
    out = sl.save(sl.compress(tiny_llama, {"steps": RECIPES["rtn_int4_g32"]}).model,
                  tmp_path / "out")
    reference = sl.load(out).model
    base = AutoModel.from_pretrained(out)
    assert type(base.layers[0].mlp.up_proj) is type(reference.layers[0].mlp.up_proj)
    with torch.no_grad():
        torch.testing.assert_close(base(**token_batches[0]).last_hidden_state,
                                   reference(**token_batches[0]).last_hidden_state,
                                   rtol=0, atol=0)


def test_from_pretrained_model_saves_again_with_sl_save(tmp_path, tiny_llama, token_batches):
    out = sl.save(sl.compress(tiny_llama, {"steps": RECIPES["rtn_int4_g32"]}).model,
                  tmp_path / "out")
    again = sl.save(AutoModelForCausalLM.from_pretrained(out), tmp_path / "again")
    first, second = (json.loads((d / "config.json").read_text()) for d in (out, again))
    second.pop("dtype")  # from_pretrained records the dtype it loaded in; the rest is equal
    assert second == first
    with torch.no_grad():
        torch.testing.assert_close(sl.load(again)(**token_batches[0]).logits,
                                   sl.load(out)(**token_batches[0]).logits, rtol=0, atol=0)


# A fresh process: `import slimline` must not import transformers, and the registration must
# still be in place once transformers loads its quantizers.
_FRESH = """
import sys
import slimline
assert 'transformers' not in sys.modules, 'import slimline imported transformers'
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(model.model.layers[0].mlp.up_proj).__name__)
"""


def test_registration_waits_for_transformers_and_import_stays_lean(tmp_path, tiny_llama):
    out = sl.save(sl.compress(tiny_llama, {"steps": RECIPES["rtn_int4_g32"]}).model,
                  tmp_path / "out")
    done = subprocess.run([sys.executable, "-c", _FRESH, str(out)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "QuantLinear"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_save_pretrained_round_trips(tmp_path, tiny_llama, token_batches, name):
    out = sl.save(sl.compress(tiny_llama, {"steps": RECIPES[name]}).model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert read_manifest(tmp_path / "again")["modules"] == read_manifest(out)["modules"]
    for model in (again, sl.load(tmp_path / "again")):
        with torch.no_grad():
            torch.testing.assert_close(model(**token_batches[0]).logits,
                                       loaded(**token_batches[0]).logits, rtol=0, atol=0)


def test_compressed_model_save_pretrained_writes_a_slimline_directory(tmp_path, tiny_llama):
    from slimline.export.hf_config import GUARD_KEY

    compressed = sl.compress(tiny_llama, {"steps": RECIPES["rtn_int4_g32"]}).model
    compressed.save_pretrained(tmp_path / "out")  # the transformers habit, not sl.save
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert GUARD_KEY in config  # transformers alone refuses it instead of loading noise
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0]
                .mlp.up_proj).__name__ == "QuantLinear"
    with pytest.raises(ValueError, match="push_to_hub"):
        compressed.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(ValueError, match="max_shard_size"):
        compressed.save_pretrained(tmp_path / "x", max_shard_size="1GB")
    assert not (tmp_path / "x").exists()
    assert "save_pretrained" not in vars(tiny_llama)  # the user's model is not touched
