"""``int8_dynamic``: per-token W8A8 on a real int8 GEMM, exact against int32 arithmetic."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import slimline as sl
from slimline.core.checkpoint import read_manifest
from slimline.evaluate.conditions import cpu_features
from slimline.quantize import kernels_int8 as kernels
from slimline.quantize.int8_dynamic import Int8DynamicConfig
from slimline.quantize.w8a8 import Int8DynamicLinear


def _activations(rows: int, width: int) -> torch.Tensor:
    """LayerNorm-like activations with a few outlier channels, as in transformers."""
    x = F.layer_norm(torch.randn(rows, width), (width,))
    x[:, :3] *= 8.0
    return x


def _int32_reference(layer: Int8DynamicLinear, x: torch.Tensor) -> torch.Tensor:
    """The same maths in exact integers: Σ (u - z) · q_W in int64, then one float rescale,
    on the layer's own activation grid."""
    codes, scale, zero = kernels.quantize_per_token(x, layer.activation_bits)
    assert int(codes.max()) < 2**layer.activation_bits
    acc = (codes.long() - zero.long()) @ layer.qweight.long().t()  # exact
    out = acc.double() * scale.double() * layer.weight_scale.double()
    return (out + layer.bias.double()).float()


def _no_vnni_reason() -> str:
    return ("oneDNN's int8 GEMM runs without VNNI/AMX here (CPU flags: "
            f"{', '.join(cpu_features()) or 'none read'}): 8-bit activation codes saturate it")


@pytest.mark.parametrize("bits", [7, 8])
def test_quantize_per_token_error_and_range(bits: int) -> None:
    x = _activations(64, 96) + torch.randn(64, 1)  # skewed rows
    x[0] = 0.0
    codes, scale, zero = kernels.quantize_per_token(x, bits)
    assert codes.dtype == torch.uint8 and scale.shape == zero.shape == (64, 1)
    assert ((codes.float() - zero) * scale - x).abs().le(scale / 2 * (1 + 1e-4)).all()
    assert (codes[0].float() == zero[0]).all()  # an all-zero token stays exactly zero
    assert torch.equal(zero, zero.round()) and zero.min() >= 1 and zero.max() <= 2**bits - 2
    # every level of the grid is used: the widest token spans 2^bits - 3 steps, no more
    span = x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)
    torch.testing.assert_close(scale[1:], span[1:] / (2**bits - 3))
    widest = int((codes.amax(-1) - codes.amin(-1)).max())
    assert int(codes.max()) <= 2**bits - 1 and widest >= 2**bits - 4


def _worst_case_gemm(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (3, 5, 96) codes on a ``bits`` grid and (48, 96) int8 weights, with the extremes
    a saturating kernel gets wrong: a token at the top code against rows of ±127."""
    weight = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    weight[:2] = torch.tensor([[127], [-127]], dtype=torch.int8)
    codes = torch.randint(0, 2**bits, (3, 5, 96), dtype=torch.uint8)
    codes[0, 0] = 2**bits - 1
    return codes, weight


@pytest.mark.parametrize(
    ("kernel", "bits"),
    [("onednn", 7), ("onednn", 8), ("onednn-2pass", 8), ("int_mm", 7), ("int_mm", 8)],
)
def test_int8_gemm_equals_int32_reference_exactly(kernel: str, bits: int) -> None:
    codes, weight = _worst_case_gemm(bits)
    ones = torch.ones(48)
    if kernel.startswith("onednn"):
        if not kernels.onednn_available():
            pytest.skip("oneDNN quantized linear not available")
        if kernel == "onednn" and bits == 8 and kernels.onednn_saturates():
            pytest.skip(_no_vnni_reason())
        kernels.register_onednn_op()
        mm = kernels.onednn_int8_mm_split if kernel == "onednn-2pass" else kernels.onednn_int8_mm
        acc = mm(codes, kernels.onednn_prepack(weight), ones)
    else:
        acc = kernels.int_mm_int8_mm(codes, weight.t(), ones)
    ref = codes.long() @ weight.long().t()  # |acc| < 2^24: exact in float32 too
    assert acc.shape == (3, 5, 48)
    assert torch.equal(acc, ref.float())


def test_onednn_saturates_exactly_as_the_probe_says() -> None:
    """Why 7 bits: without VNNI the kernel adds pairs of u8·s8 products into a saturating int16
    (``vpmaddubsw``). Where the probe says so, its 8-bit result is that, bit for bit."""
    if not kernels.onednn_available():
        pytest.skip("oneDNN quantized linear not available")
    kernels.register_onednn_op()
    codes, weight = _worst_case_gemm(8)
    acc = kernels.onednn_int8_mm(codes, kernels.onednn_prepack(weight), torch.ones(48))
    exact = (codes.long() @ weight.long().t()).float()
    if not kernels.onednn_saturates():
        assert torch.equal(acc, exact)
        return
    products = codes.long()[..., None, :] * weight.long()  # (3, 5, 48, 96)
    pairs = products.unflatten(-1, (48, 2)).sum(-1).clamp(-(2**15), 2**15 - 1)
    assert torch.equal(acc, pairs.sum(-1).float()) and not torch.equal(acc, exact)
    assert kernels.activation_bits() == 7 and "7-bit" in kernels.w8a8_kernel_note()


@pytest.mark.parametrize("bits", [7, 8])
def test_layer_equals_int32_reference_up_to_float_rescale(bits: int) -> None:
    layer = Int8DynamicLinear.from_float(nn.Linear(96, 48), activation_bits=bits)
    x = _activations(20, 96)
    assert layer.activation_bits == bits
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)
    layer.use_onednn = False  # the torch._int_mm path gives the same result
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_reduced_range_where_the_kernel_would_saturate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without VNNI (forced here): new layers take 7-bit activations on the direct
    kernel, and a stored 8-bit layer runs its GEMM in two exact passes."""
    if not kernels.onednn_available():
        pytest.skip("oneDNN quantized linear not available")
    monkeypatch.setattr(kernels, "onednn_saturates", lambda: True)
    linear = nn.Linear(96, 48)
    x = _activations(20, 96)
    layer = Int8DynamicLinear.from_float(linear)
    assert (layer.activation_bits, layer.kernel_name()) == (7, "onednn")
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)
    full = Int8DynamicLinear.from_float(linear, activation_bits=8)
    assert full.kernel_name() == "onednn-2pass"
    torch.testing.assert_close(full(x), _int32_reference(full, x), rtol=1e-5, atol=1e-5)
    # half the resolution costs accuracy: the 7-bit layer is further from the float one
    err7, err8 = ((m(x) - linear(x)).norm() for m in (layer, full))
    assert err8 < err7


def test_full_range_on_the_direct_kernel_where_the_cpu_allows() -> None:
    if not kernels.onednn_available():
        pytest.skip("oneDNN quantized linear not available")
    if kernels.onednn_saturates():
        pytest.skip(_no_vnni_reason())
    layer = Int8DynamicLinear.from_float(nn.Linear(96, 48))
    assert (layer.activation_bits, layer.kernel_name()) == (8, "onednn")
    x = _activations(20, 96)
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [7, 8])
def test_output_close_to_float(bits: int) -> None:
    linear = nn.Linear(384, 256)
    layer = Int8DynamicLinear.from_float(linear, activation_bits=bits)
    x = _activations(128, 384).reshape(4, 32, 384)
    cos = F.cosine_similarity(layer(x).flatten(), linear(x).flatten(), dim=0)
    assert cos > 0.999
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() <= 127


def test_bad_activation_bits_are_rejected() -> None:
    with pytest.raises(ValueError, match="activation_bits"):
        Int8DynamicLinear(8, 4, activation_bits=6)


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


def test_checkpoint_names_the_layer_type_and_loads_in_a_fresh_process(tmp_path) -> None:
    """Checkpoints record a layer by its registered class name, so one written before
    ``Int8DynamicLinear`` moved from ``qlinear`` to ``w8a8`` still loads: the name is the
    contract, and a fresh process (nothing of slimline.quantize imported) must find it."""
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
    result = sl.compress(model, [Int8DynamicConfig()])
    sl.save(result.model, tmp_path / "ck")
    x = torch.randn(5, 64)
    save_file({"x": x, "y": result.model(x).detach()}, str(tmp_path / "io.safetensors"))
    manifest = json.loads((tmp_path / "ck" / "recipe.json").read_text())
    assert {m["type"] for m in manifest["modules"].values()} == {"Int8DynamicLinear"}
    script = f"""
import torch
from safetensors.torch import load_file
from torch import nn
import slimline as sl
io = load_file({str(tmp_path / "io.safetensors")!r})
skeleton = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
loaded = sl.load({str(tmp_path / "ck")!r}, model=skeleton)
assert type(loaded[0]).__name__ == "Int8DynamicLinear", type(loaded[0])
assert torch.equal(loaded(io["x"]), io["y"])
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def _quantize_and_save(path: Path, saturates: bool, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """``int8_dynamic`` on a one-layer model as a CPU with (or without) VNNI would, saved."""
    monkeypatch.setattr(kernels, "onednn_saturates", lambda: saturates)
    model = nn.Sequential(nn.Linear(96, 48), nn.Linear(48, 4))
    compressed = sl.compress(model, [Int8DynamicConfig()]).model
    sl.save(compressed, path)
    return compressed


@pytest.mark.parametrize("saved_on", ["vnni", "no-vnni"])
def test_checkpoint_keeps_its_activation_grid_on_another_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_on: str
) -> None:
    """The grid is the model's (stored in its metadata); the machine only picks the kernel, so
    an 8-bit checkpoint stays exact where 8-bit codes would saturate the direct GEMM, and a
    7-bit one is not silently regridded on a CPU that could do 8."""
    if not kernels.onednn_available():
        pytest.skip("oneDNN quantized linear not available")
    saturates = saved_on == "no-vnni"
    compressed = _quantize_and_save(tmp_path / "ck", saturates, monkeypatch)
    bits = 7 if saturates else 8
    manifest = read_manifest(tmp_path / "ck")
    assert manifest["modules"]["0"]["meta"]["activation_bits"] == bits
    monkeypatch.setattr(kernels, "onednn_saturates", lambda: not saturates)  # the other CPU
    layer = sl.load(tmp_path / "ck", model=nn.Sequential(nn.Linear(96, 48), nn.Linear(48, 4)))[0]
    assert isinstance(layer, Int8DynamicLinear) and layer.activation_bits == bits
    assert layer.kernel_name() == ("onednn" if saturates else "onednn-2pass")
    x = _activations(20, 96)
    torch.testing.assert_close(layer(x), _int32_reference(layer, x), rtol=1e-5, atol=1e-5)
    if saturates:  # 7 bits on the direct kernel, here as where it was made
        assert torch.equal(layer(x), compressed[0](x))


def test_checkpoint_without_activation_bits_was_8_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints written before the width was recorded were quantized with 8-bit codes."""
    _quantize_and_save(tmp_path / "ck", True, monkeypatch)
    recipe = tmp_path / "ck" / "recipe.json"
    manifest = json.loads(recipe.read_text())
    del manifest["modules"]["0"]["meta"]["activation_bits"]
    recipe.write_text(json.dumps(manifest))
    layer = sl.load(tmp_path / "ck", model=nn.Sequential(nn.Linear(96, 48), nn.Linear(48, 4)))[0]
    assert layer.activation_bits == 8


def test_config_has_no_bits_field() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        sl.Recipe.from_dict({"steps": [{"method": "int8_dynamic", "bits": 4}]})


@pytest.mark.parametrize("bits", [7, 8])
def test_forward_has_no_graph_break(bits: int) -> None:
    import torch._dynamo

    layer = Int8DynamicLinear.from_float(nn.Linear(64, 32), activation_bits=bits)
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 5, 64))
    assert explanation.graph_break_count == 0
