"""``fast_decode``'s one-call block step (``slimline.compile.decode_block``) against the Python
step and textbook attention in float64."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.compile import decode_ops
from slimline.compile.fast_decode import FastForward, decode_step
from tests.compile.test_fast_decode import tiny_qwen3

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not decode_ops.available(),
                                 reason="no C compiler / AVX2 for slimline's kernels here")]


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Softmax attention in float64, key/value heads repeated for their query heads."""
    group = q.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=0)  # (H, L, D)
    v = values.double().repeat_interleave(group, dim=0)
    weights = torch.softmax((k @ q.double().unsqueeze(-1)).squeeze(-1) * scale, dim=-1)
    return (weights.unsqueeze(1) @ v).reshape(1, -1)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "length"), [
    (8, 2, 16, 1), (8, 2, 16, 37), (32, 4, 64, 300), (24, 2, 64, 70),  # 12 heads a group
    (4, 4, 12, 33), (6, 1, 8, 9)])  # fmt: skip
def test_attend_is_softmax_attention(heads: int, kv_heads: int, dim: int, length: int) -> None:
    g = torch.Generator().manual_seed(heads + dim + length)
    q = torch.randn(heads, dim, generator=g)
    room = torch.randn(2, kv_heads, length + 5, dim, generator=g) * 2  # rows past the length
    keys, values = room[0, :, :length], room[1, :, :length]
    out = decode_ops.attend(q, keys, values, dim**-0.5)
    torch.testing.assert_close(out.double(), reference_attention(q, keys, values, dim**-0.5),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_attend_carries_nan_to_the_heads_that_read_it() -> None:
    q, keys, values = torch.randn(4, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    keys[1, 3, 0] = float("nan")
    out = decode_ops.attend(q, keys, values, 0.25).view(4, 16)
    assert out[2:].isnan().all() and not out[:2].isnan().any()  # heads 2, 3 read kv head 1


def packed(model: nn.Module, **rtn: Any) -> nn.Module:
    steps = [{"method": "rtn", "bits": 4, "group_size": 32, **rtn}, {"method": "fast_decode"}]
    return sl.compress(model, {"steps": steps}).model


def two_caches(model: nn.Module, n: int = 9) -> list[Any]:
    from transformers import DynamicCache

    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    return caches


def steps(model: nn.Module, caches: list[Any], tokens: list[int], natives: dict[int, Any],
          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logits of the Python step (caches[0]) and the C block step (caches[1]) on the same
    tokens."""
    layer = vars(model)["forward"].dynamic_layer
    out = []
    with torch.no_grad():
        for token in tokens:
            ids = torch.tensor([[token]])
            python = decode_step(model, ids, caches[0], layer, c_ops=True, natives=None)
            native = decode_step(model, ids, caches[1], layer, c_ops=True, natives=natives)
            out.append((python, native))
    return out


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_block_step_is_the_python_step(tiny_llama: nn.Module, activations: str) -> None:
    model = packed(tiny_llama, decode_activations=activations)
    caches, natives = two_caches(model), {}
    for python, native in steps(model, caches, [3, 77, 5, 120, 9, 64], natives):
        # float activations: last bits; int8: an activation rounded the other way moves a
        # logit by a step of that rounding, no more
        tol = 1e-5 if activations == "float" else 2e-3
        torch.testing.assert_close(native, python, rtol=tol, atol=tol)
    assert len(natives) == 2 and all(entry[2] is not None for entry in natives.values())
    for python_layer, native_layer in zip(caches[0].layers, caches[1].layers, strict=True):
        assert native_layer.keys.shape == python_layer.keys.shape == (1, 2, 15, 16)
        tol = 1e-5 if activations == "float" else 2e-3
        torch.testing.assert_close(native_layer.keys, python_layer.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(native_layer.values, python_layer.values, rtol=tol, atol=tol)


def test_biases_and_one_key_value_head() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=64)  # fmt: skip
    model = packed(Qwen2ForCausalLM(config).eval())
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    caches, natives = two_caches(model, 4), {}
    for python, native in steps(model, caches, [1, 2, 3], natives):
        torch.testing.assert_close(native, python, rtol=1e-5, atol=1e-5)
    assert all(entry[2] is not None for entry in natives.values())


def test_qwen3_head_norms_in_the_block_step() -> None:
    """The C block applies Qwen3's per-head q/k RMSNorms as the Python step does, and greedy
    generate through it is the packed model's own."""
    base = tiny_qwen3()
    reference = sl.compress(copy.deepcopy(base), {"steps": [
        {"method": "rtn", "bits": 4, "group_size": 32}]}).model  # fmt: skip
    model = packed(base)
    caches, natives = two_caches(model, 5), {}
    for python, native in steps(model, caches, [1, 2, 3], natives):
        torch.testing.assert_close(native, python, rtol=1e-5, atol=1e-5)
    assert all(entry[2] is not None for entry in natives.values())
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), reference.generate(ids, **greedy))
    assert vars(model)["forward"].calls == 9


def test_greedy_generate_is_the_models_own(tiny_llama: nn.Module) -> None:
    reference = sl.compress(copy.deepcopy(tiny_llama), {"steps": [
        {"method": "rtn", "bits": 4, "group_size": 32}]}).model  # fmt: skip
    model = packed(tiny_llama)
    ids = torch.randint(0, 128, (1, 6))
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), reference.generate(ids, **greedy))
    forward = vars(model)["forward"]
    assert isinstance(forward, FastForward) and forward.calls == 11
    assert all(entry[2] is not None for entry in forward.natives.values())
    twin = copy.deepcopy(model)  # after its block steps were made: the copy makes its own
    assert torch.equal(twin.generate(ids, **greedy), reference.generate(ids, **greedy))
    natives = vars(twin)["forward"].natives
    assert [entry[2].block for entry in natives.values()] == list(twin.model.layers)


def test_float_layers_hooks_and_flop_counters_take_the_python_step(
        tiny_llama: nn.Module) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    dense = sl.compress(tiny_llama, {"steps": [{"method": "fast_decode"}]}).model
    caches, natives = two_caches(dense), {}
    steps(dense, caches, [4], natives)
    assert all(entry[2] is None for entry in natives.values())  # nn.Linear: Python step

    model = packed(tiny_llama)
    caches, natives = two_caches(model), {}
    seen: list[int] = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.shape[-1]))
    steps(model, caches, [4], natives)
    assert seen == [128, 128]  # the hooked block ran in Python, both steps
    assert natives[0][2] is not None and natives[1][2] is None
    handle.remove()
    for python, native in steps(model, caches, [8], natives):
        torch.testing.assert_close(native, python, rtol=1e-5, atol=1e-5)
    assert natives[1][2] is not None and seen == [128, 128]  # unhooked: the C step again

    layer, flops = vars(model)["forward"].dynamic_layer, []
    for cache, kept in zip(caches, (None, natives), strict=True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            decode_step(model, torch.tensor([[9]]), cache, layer, c_ops=True, natives=kept)
        flops.append(counter.get_total_flops())
    assert flops[0] > 0 and flops[1] == flops[0]  # the counter saw the same ops


def test_a_replaced_layer_makes_the_block_step_anew(tiny_llama: nn.Module) -> None:
    model = packed(tiny_llama)
    caches, natives = two_caches(model), {}
    steps(model, caches, [4], natives)
    first = natives[0][2]
    proj = model.model.layers[0].self_attn.o_proj
    proj.scales = proj.scales * 2  # buffers replaced: the prepared call is stale
    for python, native in steps(model, caches, [5], natives):
        torch.testing.assert_close(native, python, rtol=1e-5, atol=1e-5)
    assert natives[0][2] is not None and natives[0][2] is not first
