"""``rtn``: configs, accuracy, bytes, kernel paths, checkpoints, GPT-2 Conv1D."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline as sl
from slimline.quantize import kernels_weight_only as kernels
from slimline.quantize.packing import dequantize, quantize_groups
from slimline.quantize.qlinear import GEMV_MAX_ROWS, QuantLinear
from slimline.quantize.rtn import RtnConfig


def _layer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _quantized(layer: nn.Module, **fields) -> QuantLinear:
    model = sl.compress(
        nn.Sequential(layer, nn.Linear(layer.out_features, 2)), [RtnConfig(**fields)]
    )
    quant = model.model[0]
    assert isinstance(quant, QuantLinear)
    return quant


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"group_size": 0}, "group_size"),
     ({"group_size": -4}, "group_size"), ({"bits": "4"}, "bits"), ({"symmetric": 1}, "symmetric")],
)  # fmt: skip
def test_invalid_config_raises_naming_the_field_before_touching(fields, field, tiny_mlp) -> None:
    before = copy.deepcopy(tiny_mlp.state_dict())
    with pytest.raises((ValueError, TypeError), match=f"rtn.{field}"):
        sl.compress(tiny_mlp, {"steps": [{"method": "rtn", **fields}]}, inplace=True)
    assert isinstance(tiny_mlp.fc1, nn.Linear)
    for name, tensor in tiny_mlp.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_config_round_trips() -> None:
    cfg = RtnConfig(bits=3, group_size=None, symmetric=False)
    assert RtnConfig.from_dict(cfg.to_dict()) == cfg
    assert RtnConfig().to_dict()["bits"] == 4 and RtnConfig().group_size == 128


def test_int8_error_small_int4_larger_but_bounded() -> None:
    layer = nn.Linear(512, 256)
    x = torch.randn(64, 512)
    ref = layer(x)
    errors = {}
    for bits in (8, 4, 3):
        out = _quantized(layer, bits=bits)(x)
        errors[bits] = ((out - ref).norm() / ref.norm()).item()
    assert errors[8] < 0.005
    assert errors[8] < errors[4] < 0.1
    assert errors[4] < errors[3] < 0.25


@pytest.mark.parametrize(
    ("fields", "ratio"),
    [({"bits": 4, "group_size": 128}, 0.16), ({"bits": 8, "group_size": None}, 0.28),
     ({"bits": 8, "group_size": 128}, 0.28), ({"bits": 4, "group_size": 128, "symmetric": False}, 0.16),
     ({"bits": 3, "group_size": 128}, 0.13), ({"bits": 2, "group_size": 128}, 0.10)],
)  # fmt: skip
def test_bytes_as_stored(fields, ratio: float) -> None:
    layer = nn.Linear(1024, 256)  # weight (256, 1024)
    quant = _quantized(layer, **fields)
    assert _layer_bytes(quant) <= ratio * _layer_bytes(layer)
    assert quant.qweight.dtype == torch.uint8
    assert quant.qweight.numel() == 256 * 1024 * fields["bits"] // 8


def test_ragged_last_group_forward_matches_dequantized_reference() -> None:
    layer = nn.Linear(200, 48)  # 200 = 128 + 72
    quant = _quantized(layer, bits=4, group_size=128, symmetric=False)
    assert quant.scales.shape == (48, 2)
    q, scales, zeros = quantize_groups(layer.weight, 4, 128, False)
    torch.testing.assert_close(quant.dequantized_weight(), dequantize(q, scales, zeros, 128))
    for rows in (5, GEMV_MAX_ROWS + 1):  # the gemv kernel (where it runs), then F.linear
        x = torch.randn(rows, 200)
        torch.testing.assert_close(quant(x), F.linear(x, quant.dequantized_weight(), layer.bias))
    assert quant.kernel_path(x) == "dequant"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "fields",
    [{"bits": 4, "group_size": 128}, {"bits": 4, "group_size": 64, "symmetric": False},
     {"bits": 4, "group_size": None}, {"bits": 8, "group_size": None}],
)  # fmt: skip
def test_kernel_paths_equal_dequantize_path(fields, dtype: torch.dtype) -> None:
    quant = _quantized(nn.Linear(256, 64), **fields)
    x = torch.randn(1, 1, 256).to(dtype)  # one row: the weight-only kernels' regime
    torch_kernel = "int4pack" if fields["bits"] == 4 else "int8pack"
    expected = torch_kernel if quant._gemv_problem(dtype) else "gemv"
    assert quant.kernel_path(x) == expected
    out = quant(x)
    ref = kernels.dequant_linear(x.float(), quant.dequantized_weight(), quant.bias)
    assert out.dtype == dtype and out.shape == (1, 1, 64)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    many = torch.randn(4096, 256).to(dtype)  # many rows: dequantize + GEMM
    assert quant.kernel_path(many) == "dequant"


def test_kernel_constraints() -> None:
    assert kernels.int4pack_group(64, 256, 128) == 128
    assert kernels.int4pack_group(64, 256, 256) == 256  # per-channel runs as groups of 256
    assert kernels.int4pack_group(40, 256, 128) is None  # N % 16
    assert kernels.int4pack_group(64, 200, 128) is None  # ragged groups
    assert kernels.int4pack_group(64, 256, 16) is None  # group size the kernel lacks
    assert kernels.int8pack_fits(384) and not kernels.int8pack_fits(100)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_save_load_sequential_skeleton_identical(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 80), nn.Linear(80, 8))
    result = sl.compress(model, {"steps": [{"method": "rtn", "bits": 3, "group_size": 32}]})
    x = torch.randn(7, 256)
    out = result.model(x)
    sl.save(result.model, tmp_path / "ck")
    skeleton = nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 80), nn.Linear(80, 8))
    loaded = sl.load(tmp_path / "ck", model=skeleton)
    assert isinstance(loaded[0], QuantLinear) and loaded[0].bits == 3
    assert torch.equal(loaded(x), out)


def test_save_load_llama_identical(tmp_path) -> None:
    model = _tiny_llama()
    result = sl.compress(model, {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    assert "model.layers.0.mlp.down_proj" in result.steps[0].modules
    assert "lm_head" not in result.steps[0].modules  # the output head stays float
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        out = result.model(input_ids=ids).logits
        sl.save(result.model, tmp_path / "ck")
        loaded = sl.load(tmp_path / "ck")
        assert isinstance(loaded.model.layers[1].self_attn.q_proj, QuantLinear)
        assert torch.equal(loaded(input_ids=ids).logits, out)
    on_disk = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert on_disk < sum(t.numel() * 4 for t in model.state_dict().values())


def test_gpt2_conv1d_layers_match_dequantized_reference() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    )
    model.eval()
    result = sl.compress(model, {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    names = result.steps[0].modules
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(names)
    reference = copy.deepcopy(model)  # Conv1D stores (in, out): the dequantized weight, transposed
    for name in names:
        quant = result.model.get_submodule(name)
        assert isinstance(quant, QuantLinear)
        conv = reference.get_submodule(name)
        conv.weight.data = quant.dequantized_weight().t().contiguous()
    ids = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        out = result.model(input_ids=ids).logits
        torch.testing.assert_close(out, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert (out.argmax(-1) == model(input_ids=ids).logits.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (8, None), (3, 64)])
def test_forward_has_no_graph_break(bits: int, group_size) -> None:
    import torch._dynamo

    quant = _quantized(nn.Linear(256, 64), bits=bits, group_size=group_size)
    for x in (torch.randn(2, 256).bfloat16(), torch.randn(300, 256)):  # kernel, dequantize
        assert torch._dynamo.explain(quant)(x).graph_break_count == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_a_reassigned_buffer_remakes_the_torch_kernels_layouts(bits: int) -> None:
    """The torch kernels' derived layouts (int4 tiles, the int8 copy) follow the buffers: after
    ``layer.qweight = ...`` the layer computes with the new codes, not the old layout."""
    torch.manual_seed(0)
    layer = _quantized(nn.Linear(256, 64), bits=bits, group_size=64 if bits == 4 else None)
    x = torch.randn(3, 256).to(torch.bfloat16)
    layer.kernel_path = lambda x: "int4pack" if bits == 4 else "int8pack"  # type: ignore[method-assign]
    layer(x)  # the layouts of the first codes
    q, scales, zeros = quantize_groups(torch.randn(64, 256), bits, layer.group_size, True)
    other = QuantLinear.from_codes(q, scales, zeros, bias=layer.bias, bits=bits,
                                   group_size=layer.group_size, symmetric=True)  # fmt: skip
    layer.qweight, layer.scales = other.qweight.clone(), other.scales.clone()
    ref = x.float() @ other.dequantized_weight().t() + layer.bias
    torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())

