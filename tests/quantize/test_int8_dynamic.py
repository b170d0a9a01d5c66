"""``int8_dynamic``: per-token W8A8 on a real int8 GEMM, exact against int32 arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline as sl
from slimline.quantize import kernels
from slimline.quantize.int8_dynamic import Int8DynamicConfig
from slimline.quantize.qlinear import Int8DynamicLinear


def _activations(rows: int, width: int) -> torch.Tensor:
    """LayerNorm-like activations with a few outlier channels, as in transformers."""
    x = F.layer_norm(torch.randn(rows, width), (width,))
    x[:, :3] *= 8.0
    return x


def _int32_reference(layer: Int8DynamicLinear, x: torch.Tensor) -> torch.Tensor:
    """The same maths in exact integers: Σ (u - z) · q_W in int64, then one float rescale."""
    codes, scale, zero = kernels.quantize_per_token(x)
    acc = (codes.long() - zero.long()) @ layer.qweight.long().t()  # exact
    out = acc.double() * scale.double() * layer.weight_scale.double()
    return (out + layer.bias.double()).float()


def test_quantize_per_token_error_and_range() -> None:
    x = _activations(64, 96) + torch.randn(64, 1)  # skewed rows
    x[0] = 0.0
    codes, scale, zero = kernels.quantize_per_token(x)
    assert codes.dtype == torch.uint8 and scale.shape == zero.shape == (64, 1)
    assert ((codes.float() - zero) * scale - x).abs().le(scale / 2 * (1 + 1e-4)).all()
    assert (codes[0].float() == zero[0]).all()  # an all-zero token stays exactly zero
    assert torch.equal(zero, zero.round()) and zero.min() >= 1 and zero.max() <= 254


@pytest.mark.parametrize("kernel", ["onednn", "int_mm"])
def test_int8_gemm_equals_int32_reference_exactly(kernel: str) -> None:
    weight = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    codes = torch.randint(0, 256, (3, 5, 96), dtype=torch.uint8)
    ones = torch.ones(48)
    if kernel == "onednn":
        if not kernels.onednn_available():
            pytest.skip("oneDNN quantized linear not available")
        kernels.register_onednn_op()
        acc = kernels.onednn_int8_mm(codes, kernels.onednn_prepack(weight), ones)
    else:
        acc = kernels.int_mm_int8_mm(codes, weight.t(), ones)
    ref = codes.long() @ weight.long().t()  # |acc| < 2^24: exact in float32 too
    assert acc.shape == (3, 5, 48)
    assert torch.equal(acc, ref.float())


def test_layer_equals_int32_reference_up_to_float_rescale() -> None:
    layer = Int8DynamicLinear.from_float(nn.Linear(96, 48))
    x = _activations(20, 96)
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)
    layer.use_onednn = False  # the torch._int_mm path gives the same result
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_output_close_to_float() -> None:
    linear = nn.Linear(384, 256)
    layer = Int8DynamicLinear.from_float(linear)
    x = _activations(128, 384).reshape(4, 32, 384)
    cos = F.cosine_similarity(layer(x).flatten(), linear(x).flatten(), dim=0)
    assert cos > 0.999
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() <= 127


def test_compress_save_load_deepcopy(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 4))
    result = sl.compress(model, [Int8DynamicConfig()])
    assert result.steps[0].modules == ["0", "2"]  # the head stays float
    x = torch.randn(6, 64)
    out = result.model(x)
    assert torch.equal(copy.deepcopy(result.model)(x), out)
    sl.save(result.model, tmp_path / "ck")
    skeleton = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 4))
    loaded = sl.load(tmp_path / "ck", model=skeleton)
    assert isinstance(loaded[0], Int8DynamicLinear)
    assert torch.equal(loaded(x), out)
    stored = sum(t.numel() * t.element_size() for t in loaded[0].state_dict().values())
    assert stored <= 0.28 * (64 * 128 + 128) * 4


def test_config_has_no_bits_field() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        sl.Recipe.from_dict({"steps": [{"method": "int8_dynamic", "bits": 4}]})


def test_forward_has_no_graph_break() -> None:
    import torch._dynamo

    layer = Int8DynamicLinear.from_float(nn.Linear(64, 32))
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 5, 64))
    assert explanation.graph_break_count == 0
