from __future__ import annotations

import json
import os
from pathlib import Path

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
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["README.md", "model.safetensors", "recipe.json"]


# --- broken checkpoints are refused, naming the file and the tensor -----------------------

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def rtn_digits(tmp_path_factory):
    """A real checkpoint: the built-in digits CNN with fc1 packed to int4 (QuantLinear)."""
    from slimline.models import load_builtin

    model = load_builtin("digits-cnn").model
    result = sl.compress(model, {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    path = tmp_path_factory.mktemp("rtn") / "ck"
    sl.save(result.model, path)
    return path, result.model


@pytest.fixture
def ck(tmp_path, rtn_digits):
    """A fresh copy of the rtn checkpoint to break."""
    import shutil

    return Path(shutil.copytree(rtn_digits[0], tmp_path / "ck"))


def _rewrite(path, change) -> None:
    """Load the weights file, let ``change`` edit the dict, write it back as safetensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS))


def _edit_manifest(path, change) -> None:
    manifest = json.loads((path / "recipe.json").read_text())
    change(manifest)
    (path / "recipe.json").write_text(json.dumps(manifest))


def test_intact_rtn_checkpoint_loads_exactly(ck, rtn_digits) -> None:
    loaded = sl.load(ck)
    assert type(loaded.fc1).__name__ == "QuantLinear"
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), rtn_digits[1](x), rtol=0, atol=0)


def test_truncated_weights_file(ck) -> None:
    data = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        sl.load(ck)


@pytest.mark.parametrize("garbage", [b"{nope", b"\xff\xfe\xfd\xfc\xfb", b""])
def test_corrupt_header(ck, garbage: bytes) -> None:
    data = (ck / WEIGHTS).read_bytes()
    broken = data[:8] + garbage + data[8 + len(garbage):] if garbage else data[:4]
    (ck / WEIGHTS).write_bytes(broken)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        sl.load(ck)


@pytest.mark.parametrize("name", ["fc1.qweight", "fc1.scales", "head.weight", "conv1.bias"])
def test_missing_tensor_is_named(ck, name: str) -> None:
    _rewrite(ck, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' is missing"):
        sl.load(ck)


def test_unexpected_tensor_is_named(ck) -> None:
    _rewrite(ck, lambda t: t.update({"fc9.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: holds tensor 'fc9.weight'"):
        sl.load(ck)


@pytest.mark.parametrize(
    ("name", "tensor", "expected"),
    [
        ("fc1.qweight", torch.zeros(16384, dtype=torch.uint8), r"shape \[16384\].*\[32768\]"),
        ("fc1.scales", torch.ones(128, 8, dtype=torch.float16), r"shape \[128, 8\].*\[128, 16\]"),
        ("head.weight", torch.zeros(10, 64), r"shape \[10, 64\].*\[10, 128\]"),
    ],
)
def test_wrong_shape_is_named(ck, name: str, tensor, expected: str) -> None:
    _rewrite(ck, lambda t: t.update({name: tensor}))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has {expected}"):
        sl.load(ck)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("fc1.qweight", torch.int8, "dtype int8, the model expects uint8"),
        ("fc1.qweight", torch.float32, "dtype float32, the model expects uint8"),
        ("head.weight", torch.int64, "dtype int64, the model expects float32"),
        ("conv1.weight", torch.float8_e4m3fn, "dtype float8_e4m3fn, the model expects float32"),
    ],
)
def test_wrong_dtype_is_named(ck, name: str, dtype, expected: str) -> None:
    _rewrite(ck, lambda t: t.update({name: t[name].to(dtype)}))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has {expected}"):
        sl.load(ck)


def test_another_float_width_is_accepted(ck, rtn_digits) -> None:
    """A cast (``half``, or a bf16 source model) stores floats in another width: still loads."""
    _rewrite(ck, lambda t: t.update({"head.weight": t["head.weight"].to(torch.bfloat16)}))
    assert sl.load(ck).head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m.update(modules=[1, 2]), "modules must be a JSON object"),
        (lambda m: m.update(recipe={"steps": [{"method": "nope"}]}), "recipe is invalid"),
        (lambda m: m.update(architecture={"kind": "pickle", "class": "x"}), "architecture"),
        (lambda m: m["architecture"].update(kwargs={"colour": 3}), "architecture.kwargs"),
        (lambda m: m["modules"]["fc1"]["meta"].pop("bits"), "module 'fc1'.*bad metadata"),
        (lambda m: m["modules"]["fc1"].update(type="Pickled"), "unknown module type"),
        (lambda m: m["modules"].update(nowhere=m["modules"]["fc1"]), "'nowhere' is not in"),
        (lambda m: m.update(aliases={"head.weight": "fc2.weight"}), "'fc2.weight'"),
        (lambda m: m.update(sparse={"head.weight": "big"}), r"sparse\['head.weight'\]"),
    ],
)
def test_malformed_manifest_is_named(ck, change, expected: str) -> None:
    _edit_manifest(ck, change)
    with pytest.raises(ValueError, match=expected) as info:
        sl.load(ck)
    assert "recipe.json" in str(info.value) or "model.safetensors" in str(info.value)


def test_manifest_that_is_not_json(ck) -> None:
    (ck / "recipe.json").write_text('{"format": "slimline-checkpoint", ')
    with pytest.raises(ValueError, match=r"recipe\.json is not valid JSON"):
        sl.load(ck)


def test_hf_architecture_must_be_a_model_class(tmp_path, tiny_llama) -> None:
    sl.save(tiny_llama, tmp_path / "ck")
    _edit_manifest(tmp_path / "ck", lambda m: m["architecture"].update({"class": "pipeline"}))
    with pytest.raises(ValueError, match="no model class 'pipeline'"):
        sl.load(tmp_path / "ck")


def test_broken_checkpoint_leaves_the_given_model_untouched(tmp_path, tiny_mlp) -> None:
    result = sl.compress(tiny_mlp, {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    sl.save(result.model, tmp_path / "ck")
    _rewrite(tmp_path / "ck", lambda t: t.update({"fc2.scales": t["fc2.scales"][:, :1].clone()}))
    skeleton = TinyMLP()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'fc2\.scales' has shape \[64, 1\]"):
        sl.load(tmp_path / "ck", model=skeleton)
    assert type(skeleton.fc2) is torch.nn.Linear
    for name, tensor in skeleton.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.fixture
def sparse_ck(tmp_path):
    from slimline.models import load_builtin

    model = load_builtin("digits-cnn").model
    result = sl.compress(model, {"steps": [{"method": "magnitude", "sparsity": 0.5}]})
    sl.save(result.model, tmp_path / "ck")
    assert "fc1.weight" in json.loads((tmp_path / "ck" / "recipe.json").read_text())["sparse"]
    return tmp_path / "ck"


def test_sparse_mask_of_wrong_size_is_named(sparse_ck) -> None:
    _rewrite(sparse_ck, lambda t: t.update({"fc1.weight.__mask__": t["fc1.weight.__mask__"][1:]}))
    with pytest.raises(ValueError, match=r"model\.safetensors: sparse tensor 'fc1\.weight'"):
        sl.load(sparse_ck)


def test_sparse_values_that_disagree_with_the_mask_are_named(sparse_ck) -> None:
    key = "fc1.weight.__values__"
    _rewrite(sparse_ck, lambda t: t.update({key: t[key][:-3].clone()}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'fc1\.weight'.*disagree"):
        sl.load(sparse_ck)
