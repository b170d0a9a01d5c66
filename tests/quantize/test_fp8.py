"""``fp8``: rounding bounds, bytes as stored, checkpoints, Conv1D, E4M3 vs E5M2, config checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline as sl
from slimline.quantize.fp8 import Fp8Config, Fp8Linear, fp8_dequantize, fp8_quantize_weight

# Half an ulp, relative, for normal numbers: 3 mantissa bits (E4M3), 2 (E5M2).
_REL = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
# Smallest normal exponent (E4M3: 2^-6, E5M2: 2^-14) and half the subnormal step below it.
_MIN_NORMAL = {"e4m3": 2.0**-6, "e5m2": 2.0**-14}
_HALF_SUBNORMAL = {"e4m3": 2.0**-10, "e5m2": 2.0**-17}


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((w - w_hat).norm() / w.norm()).item()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_round_trip_within_the_format_precision(fmt: str, mode: str) -> None:
    w = torch.randn(64, 256) * torch.logspace(-3, 0, 64)[:, None]  # rows of varied magnitude
    w8, scale = fp8_quantize_weight(w, fmt, mode)  # type: ignore[arg-type]
    assert w8.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    assert scale.dtype == torch.float32 and scale.shape == ((64, 1) if mode == "channel" else (1, 1))
    w_hat = fp8_dequantize(w8, scale, torch.float32)
    scaled = (w / scale).abs()  # where each weight lands in the format's range
    normal = scaled >= _MIN_NORMAL[fmt]
    err = (w - w_hat).abs()
    assert bool((err[normal] <= _REL[fmt] * w.abs()[normal] * (1 + 1e-6)).all())
    bound = (_HALF_SUBNORMAL[fmt] * scale).expand_as(w)[~normal]
    assert bool((err[~normal] <= bound * (1 + 1e-6)).all())
    assert float(scaled.max()) <= torch.finfo(w8.dtype).max * (1 + 1e-6)  # absmax maps to max


def test_e4m3_more_precise_than_e5m2_on_normal_range_weights() -> None:
    w = torch.randn(128, 256) * 0.02
    errors = {
        fmt: _rel_error(w, fp8_dequantize(*fp8_quantize_weight(w, fmt, "channel"), torch.float32))  # type: ignore[arg-type]
        for fmt in ("e4m3", "e5m2")
    }
    # Observed: e4m3 ≈ 0.026, e5m2 ≈ 0.052 — one mantissa bit fewer, twice the error.
    assert errors["e4m3"] < 0.03 and errors["e5m2"] < 0.06
    assert errors["e4m3"] < 0.6 * errors["e5m2"]


def test_bytes_as_stored_quarter_of_fp32() -> None:
    layer = nn.Linear(512, 256)
    quant = Fp8Linear.from_float(layer, "e4m3", "channel")
    assert quant.weight_fp8.dtype == torch.float8_e4m3fn and quant.weight_fp8.element_size() == 1
    weight_bytes = 256 * 512
    assert _bytes(quant) == weight_bytes + 256 * 4 + 256 * 4  # fp8 weight + scales + bias
    assert _bytes(quant) <= 0.26 * _bytes(layer)


def test_forward_matches_dequantized_reference() -> None:
    layer = nn.Linear(96, 40)
    quant = Fp8Linear.from_float(layer, "e4m3", "channel")
    x = torch.randn(3, 5, 96)
    ref = x @ quant.dequantized_weight().t() + layer.bias
    assert torch.allclose(quant(x), ref, atol=1e-5)
    assert _rel_error(layer(x).detach(), quant(x)) < 0.03


def test_save_load_llama_identical_and_float8_on_disk(tmp_path, tiny_llama) -> None:
    from safetensors import safe_open

    result = sl.compress(tiny_llama, {"steps": [{"method": "fp8"}]})
    assert "lm_head" not in result.steps[0].modules
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out = result.model(input_ids=ids).logits
        sl.save(result.model, tmp_path / "ck")
        loaded = sl.load(tmp_path / "ck")
        layer = loaded.model.layers[1].mlp.down_proj
        assert isinstance(layer, Fp8Linear) and layer.weight_fp8.dtype == torch.float8_e4m3fn
        assert torch.equal(loaded(input_ids=ids).logits, out)
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        key = next(k for k in names if k.endswith("layers.0.mlp.down_proj.weight_fp8"))
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn


def test_save_load_e5m2_per_tensor(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 4))
    recipe = {"steps": [{"method": "fp8", "format": "e5m2", "scale": "tensor"}]}
    result = sl.compress(model, recipe)
    x = torch.randn(6, 64)
    out = result.model(x)
    sl.save(result.model, tmp_path / "ck")
    skeleton = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 4))
    loaded = sl.load(tmp_path / "ck", model=skeleton)
    assert isinstance(loaded[0], Fp8Linear) and loaded[0].weight_fp8.dtype == torch.float8_e5m2
    assert loaded[0].scale.shape == (1, 1) and loaded[0].bias is None
    assert torch.equal(loaded(x), out)


def test_gpt2_conv1d_uses_the_out_in_view() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2, n_head=4))
    model.eval()
    result = sl.compress(model, {"steps": [{"method": "fp8"}]})
    names = result.steps[0].modules
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(names)
    attn = result.model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(attn, Fp8Linear) and attn.weight_fp8.shape == (192, 64)  # (out, in)
    reference = copy.deepcopy(model)
    for name in names:
        quant = result.model.get_submodule(name)
        reference.get_submodule(name).weight.data = quant.dequantized_weight().t().contiguous()
    ids = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        out = result.model(input_ids=ids).logits
        assert torch.allclose(out, reference(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"format": "e3m4"}, "format"), ({"format": 4}, "format"), ({"scale": "group"}, "scale")],
)
def test_invalid_fields_raise_naming_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"fp8.{field}"):
        Fp8Config.from_dict(fields)


def test_pure_function_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="fp8.format"):
        fp8_quantize_weight(torch.randn(4, 4), "e2m5", "channel")  # type: ignore[arg-type]


def test_config_round_trip_and_zero_rows() -> None:
    cfg = Fp8Config(format="e5m2", scale="tensor")
    assert Fp8Config.from_dict(cfg.to_dict()) == cfg
    w = torch.zeros(3, 8)
    w8, scale = fp8_quantize_weight(w, "e4m3", "channel")
    assert torch.equal(scale, torch.ones(3, 1)) and bool((w8.float() == 0).all())


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")
@pytest.mark.parametrize(("mode", "dtype"), [("tensor", torch.float32), ("tensor", torch.bfloat16),
                                             ("channel", torch.bfloat16)])
def test_scaled_mm_path_is_the_textbook_fp8_product(mode: str, dtype: torch.dtype) -> None:
    """The FP8 tensor-core call (CUDA only in ``forward``) run through torch's own CPU
    ``_scaled_mm`` (torch 2.13 has one): x rounded to E4M3 per tensor or per row, times the
    stored weight and scales, plus the bias, against the same product in float64."""
    from slimline.quantize.fp8 import _scaled_mm_linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Fp8Linear.from_float(linear, "e4m3", mode)  # type: ignore[arg-type]
    x = (torch.randn(2, 5, 64) * 3).to(dtype)
    try:
        got = _scaled_mm_linear(layer, x)
    except (RuntimeError, NotImplementedError) as error:  # a torch build without the CPU kernel
        pytest.skip(f"torch {torch.__version__} runs no _scaled_mm here: {error}")
    rows = x.reshape(-1, 64).double()
    top = 448.0  # E4M3's largest finite value
    amax = rows.abs().amax() if mode == "tensor" else rows.abs().amax(dim=1, keepdim=True)
    x_scale = (amax.float() / top).clamp_min(1e-12).double()
    x8 = (rows / x_scale).clamp(-top, top).float().to(torch.float8_e4m3fn).double() * x_scale
    want = x8 @ layer.dequantized_weight(torch.float64).t() + linear.bias.double()
    assert got.dtype == dtype and got.shape == (2, 5, 48)
    # the output's own rounding (bf16: the product, then its sum with the bias), bounded by
    # the sizes of the terms summed
    tolerance = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    weight = layer.dequantized_weight(torch.float64)
    terms = x8.abs() @ weight.abs().t() + linear.bias.double().abs()
    err = (got.reshape(-1, 48).double() - want).abs()
    assert bool((err <= tolerance * terms).all()), err.max()
    upcast = F.linear(rows, layer.dequantized_weight(torch.float64), linear.bias.double())
    # x's rounding to E4M3 is what tells the two apart, far above the output's rounding
    assert (want - upcast).abs().mean() > 3 * err.mean()
