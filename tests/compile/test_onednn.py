"""``onednn``: Linear layers on oneDNN's matmul, against ``F.linear`` and the model's own forward."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline as sl
from slimline.compile.onednn import (
    OneDNNForward,
    onednn_linear,
    parity_error,
    reorder,
    why_unavailable,
)
from slimline.core.targets import linear_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def onednn(model: nn.Module, *steps: dict[str, Any], **fields: Any) -> nn.Module:
    return sl.compress(model, {"steps": [*steps, {"method": "onednn", **fields}]}).model


def forwards(model: nn.Module) -> dict[str, OneDNNForward]:
    return {name: f for name, m in model.named_modules()
            if isinstance(f := vars(m).get("forward"), OneDNNForward)}


def test_operators_exist_in_the_locked_torch() -> None:
    # The step leans on two operators inductor emits (not public API): named here so that a
    # torch without them fails this test, not a user's recipe. Checked on torch 2.13.0.
    assert why_unavailable() is None, torch.__version__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 3, 17])
def test_onednn_linear_is_f_linear(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    x = torch.randn(2, rows, 24, generator=g).to(dtype)
    reference = F.linear(x.double(), weight.double(), bias.double())
    for w in (weight, reorder(weight)):
        got = onednn_linear(x, w, bias)
        assert got.shape == (2, rows, 40) and got.dtype == dtype
        if rows:
            # float32 to summation order; bf16 to one rounding of the output
            tolerance = 1e-5 if dtype == torch.float32 else 2.0**-8
            assert float((got.double() - reference).abs().max()) <= tolerance * float(
                reference.abs().max())
    # A strided input (a transposed view) and no bias.
    xt = torch.randn(24, 5, generator=g).to(dtype).t()
    assert torch.allclose(onednn_linear(xt, weight, None).float(), F.linear(xt, weight).float(),
                          rtol=1e-2, atol=1e-2)


def test_parity_check_is_small() -> None:
    assert parity_error(torch.float32) < 1e-5
    assert parity_error(torch.bfloat16) < 2.0**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_logits_and_greedy_generate_match_the_model(tiny_llama: nn.Module,
                                                           dtype: torch.dtype) -> None:
    base = tiny_llama.to(dtype)
    fast = onednn(base)
    ids = torch.randint(0, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    with torch.inference_mode():
        want, got = base(input_ids=ids, attention_mask=mask).logits, fast(
            input_ids=ids, attention_mask=mask).logits
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance)
        if dtype == torch.float32:
            out = fast.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
            ref = base.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
            assert torch.equal(out, ref)
    steps = forwards(fast)
    # Default targets: every Linear but the output head; each ran on oneDNN.
    linear = [n for n, m in fast.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(steps) == sorted(linear)
    assert all(f.calls > 0 for f in steps.values())
    # The user's model is untouched.
    assert not forwards(base)


def test_bf16_weights_are_reordered_once_and_again_when_they_change(tiny_llama: nn.Module) -> None:
    fast = onednn(tiny_llama.to(torch.bfloat16))
    layer = fast.model.layers[0].mlp.up_proj
    forward = vars(layer)["forward"]
    assert forward._reordered is not None  # at apply time
    first = forward._reordered[1]
    x = torch.randn(1, 3, 64).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        assert forward._reordered[1] is first  # reused
        layer.weight.mul_(2)  # written in place: a new version
        assert torch.allclose(layer(x).float(), F.linear(x, layer.weight).float(), atol=1e-2,
                              rtol=1e-2)
    assert forward._reordered[1] is not first
    # The note names the extra memory: one bf16 copy of each layer's weight.
    result = sl.compress(tiny_llama.to(torch.bfloat16), {"steps": [{"method": "onednn"}]})
    mib = sum(linear_weight(m).numel() * 2 for n, m in tiny_llama.named_modules()
              if isinstance(m, nn.Linear) and n != "lm_head") / 2**20
    assert f"{mib:.1f} MiB more memory" in " ".join(result.steps[0].notes)


def test_float32_uses_the_weight_itself(tiny_llama: nn.Module) -> None:
    fast = onednn(tiny_llama)
    layer = fast.model.layers[0].self_attn.q_proj
    forward = vars(layer)["forward"]
    assert forward.weight_for_onednn(layer.weight) is layer.weight
    assert forward.reordered_bytes() == 0


def test_gradients_and_other_dtypes_take_the_layer_s_own_forward(tiny_mlp: nn.Module) -> None:
    fast = onednn(tiny_mlp)
    forward = vars(fast.fc1)["forward"]
    x = torch.randn(4, 32, requires_grad=True)
    fast(x).sum().backward()  # grad enabled, weights require grad: F.linear, autograd works
    assert forward.calls == 0 and x.grad is not None and fast.fc1.weight.grad is not None
    with torch.no_grad():
        fast(x.double().detach().float())
    assert forward.calls == 1
    # An input of another dtype: the layer's own forward (which refuses it).
    with torch.no_grad(), pytest.raises(RuntimeError):
        fast(x.detach().double())
    assert forward.calls == 1


def test_gpt2_conv1d_layers(tiny_gpt2: nn.Module) -> None:
    fast = onednn(tiny_gpt2)
    ids = torch.randint(0, 128, (1, 9))
    with torch.inference_mode():
        assert torch.allclose(fast(input_ids=ids).logits, tiny_gpt2(input_ids=ids).logits,
                              atol=1e-5, rtol=1e-5)
    assert any(name.endswith("c_attn") for name in forwards(fast))
    assert all(f.calls == 1 for f in forwards(fast).values())


def test_float16_layers_are_left_with_a_note(tiny_mlp: nn.Module) -> None:
    model = copy.deepcopy(tiny_mlp)
    model.fc2.to(torch.float16)
    result = sl.compress(model, {"steps": [{"method": "onednn"}]})
    assert sorted(forwards(result.model)) == ["fc1"]
    assert any("float16" in note and "fc2" in note for note in result.steps[0].notes)


def test_save_load_deepcopy_and_compile(tiny_llama: nn.Module, tmp_path: Any) -> None:
    fast = onednn(tiny_llama, {"method": "half"})
    ids = torch.randint(0, 128, (1, 7))
    with torch.inference_mode():
        want = fast(input_ids=ids).logits
    sl.save(fast, tmp_path / "out")
    loaded = sl.load(tmp_path / "out")
    assert sorted(forwards(loaded)) == sorted(forwards(fast))
    copied = copy.deepcopy(fast)
    assert all(f.layer is m for n, f in forwards(copied).items()
               for m in [copied.get_submodule(n)])
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, want)
        assert torch.equal(copied(input_ids=ids).logits, want)
    # The checkpoint is the plain model's: transformers reads it without slimline.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.inference_mode():
        assert torch.allclose(plain(input_ids=ids).logits.float(), want.float(), atol=5e-2)


def test_torch_compile_after_it_traces_the_plain_layers(tiny_mlp: nn.Module) -> None:
    fast = onednn(tiny_mlp)
    compiled = torch.compile(fast, backend="eager")
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), tiny_mlp(x), atol=1e-5)
    assert vars(fast.fc1)["forward"].calls == 0  # traced through F.linear


def test_bad_input_is_refused_before_the_model_changes(tiny_mlp: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(onednn\): targets.include 'nothing' matches no module"):
        onednn(tiny_mlp, targets={"include": ["nothing"]})
    with pytest.raises(ValueError, match=r"\(half\) must come before step 0 \(onednn\)"):
        sl.compress(tiny_mlp, {"steps": [{"method": "onednn"}, {"method": "half"}]})
    assert not forwards(tiny_mlp)


def test_flops_are_counted_as_for_the_plain_model(tiny_llama: nn.Module) -> None:
    from slimline.evaluate.footprint import count_flops

    batch = {"input_ids": torch.randint(0, 128, (2, 9))}
    fast = onednn(tiny_llama)
    with torch.inference_mode():
        assert count_flops(fast, batch) == count_flops(tiny_llama, batch) > 0
    assert vars(fast.model.layers[0].mlp.up_proj)["forward"].calls > 0


def test_fast_decode_and_speculative_run_its_layers(tiny_llama: nn.Module) -> None:
    model = sl.compress(tiny_llama, {"steps": [
        {"method": "onednn"}, {"method": "speculative", "mode": "prompt_lookup"}]}).model
    fast = sl.compress(tiny_llama, {"steps": [
        {"method": "onednn"}, {"method": "fast_decode"}]}).model
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8,
                              "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        want = tiny_llama.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, **kwargs), want)
        assert torch.equal(fast.generate(ids, **kwargs), want)
    assert vars(fast)["forward"].calls > 0
    assert all(f.calls > 0 for f in forwards(fast).values())
    assert all(f.calls > 0 for f in forwards(model).values())
