from __future__ import annotations

import pytest
import torch

import slimline as sl


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_keeps_norms_and_signature(tiny_mlp, dtype: str) -> None:
    model = sl.compress(tiny_mlp, {"steps": [{"method": "half", "dtype": dtype}]}).model
    torch_dtype = getattr(torch, dtype)
    assert model.fc1.weight.dtype == torch_dtype
    assert model.head.weight.dtype == torch_dtype
    assert model.norm.weight.dtype == torch.float32
    x = torch.randn(8, 32)  # fp32 input still accepted
    out = model(x)
    ref = tiny_mlp(x)
    assert out.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1).mean()
    assert cos > 0.999


def test_half_keep_head(tiny_llama, token_batches) -> None:
    model = sl.compress(tiny_llama, {"steps": [{"method": "half", "keep_head": True}]}).model
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(**token_batches[0]).logits
        ref = tiny_llama(**token_batches[0]).logits
    assert logits.dtype == torch.float32
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_half_save_load_same_output(tmp_path, tiny_llama, token_batches) -> None:
    model = sl.compress(tiny_llama, {"steps": [{"method": "half"}]}).model
    sl.save(model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**token_batches[0]).logits, model(**token_batches[0]).logits, rtol=0, atol=0
        )
    # the saved weights really are 16-bit: about half the fp32 bytes
    fp32 = sum(p.numel() * 4 for p in tiny_llama.parameters())
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert size < 0.6 * fp32
