from __future__ import annotations

import pytest
import torch

import slimline as sl


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_layer_sparsity_exact(tiny_mlp, sparsity: float) -> None:
    model = sl.compress(tiny_mlp, {"steps": [{"method": "magnitude", "sparsity": sparsity}]}).model
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight
        assert int((w == 0).sum()) == round(sparsity * w.numel())
        # survivors are the original weights, untouched
        orig = getattr(tiny_mlp, name).weight
        assert torch.equal(w[w != 0], orig[w != 0])
    assert not (model.head.weight == 0).any()  # the output head is not a default target


def test_two_four_pattern(tiny_mlp) -> None:
    model = sl.compress(tiny_mlp, {"steps": [{"method": "magnitude", "pattern": "2:4"}]}).model
    w = model.fc2.weight.reshape(64, 16, 4)
    assert bool(((w != 0).sum(-1) <= 2).all())
    assert int((w == 0).sum()) >= w.numel() // 2


def test_global_scope(tiny_mlp) -> None:
    recipe = {"steps": [{"method": "magnitude", "sparsity": 0.5, "scope": "global"}]}
    model = sl.compress(tiny_mlp, recipe).model
    zeros = int((model.fc1.weight == 0).sum() + (model.fc2.weight == 0).sum())
    assert zeros == round(0.5 * (model.fc1.weight.numel() + model.fc2.weight.numel()))


def test_conv1d_pruned_on_logical_orientation() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).eval()
    recipe = {"steps": [{"method": "magnitude", "pattern": "2:4"}]}
    pruned = sl.compress(model, recipe).model
    w = pruned.transformer.h[0].mlp.c_fc.weight.t()  # (out, in)
    groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert bool((groups <= 2).all())


def test_masks_stay_zero_through_save_load(tmp_path, tiny_llama) -> None:
    model = sl.compress(tiny_llama, {"steps": [{"method": "magnitude", "sparsity": 0.5}]}).model
    sl.save(model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    w = loaded.model.layers[0].mlp.up_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2
