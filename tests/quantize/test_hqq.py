"""``hqq``: error below RTN's, codes on the grid, ragged groups, checkpoints, config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.quantize.hqq import HqqConfig, hqq_quantize_weight, shrink_lp
from slimline.quantize.packing import dequantize, num_groups, quantize_groups
from slimline.quantize.qlinear import QuantLinear


def _heavy_tailed(n: int = 256, k: int = 512) -> torch.Tensor:
    """Student-t with 3 degrees of freedom, as LLM weights: a normal bulk and outliers."""
    g = torch.Generator().manual_seed(0)
    chi2 = torch.randn(3, n, k, generator=g).pow(2).sum(dim=0)  # (N, K) χ²₃
    return torch.randn(n, k, generator=g) / (chi2 / 3).sqrt() * 0.02  # (N, K)


def _errors(w: torch.Tensor, w_hat: torch.Tensor, p: float = 0.7) -> tuple[float, float]:
    """Relative Frobenius error and the l_p^p error HQQ minimises."""
    diff = w - w_hat
    return (diff.norm() / w.norm()).item(), diff.abs().pow(p).sum().item()


@pytest.mark.parametrize(("bits", "l2_gain"), [(4, 0.02), (3, 0.08)])
def test_error_below_rtn_asymmetric(bits: int, l2_gain: float) -> None:
    w = _heavy_tailed()
    rtn = dequantize(*quantize_groups(w, bits, 128, symmetric=False), 128)
    hqq = dequantize(*hqq_quantize_weight(w, HqqConfig(bits=bits)), 128)
    rtn_l2, rtn_lp = _errors(w, rtn)
    hqq_l2, hqq_lp = _errors(w, hqq)
    # Observed: 4 bits 0.166 -> 0.160 (l2), 3 bits 0.331 -> 0.294; l_p^p drops 4% and 12%.
    assert hqq_l2 < (1 - l2_gain) * rtn_l2
    assert hqq_lp < (1 - l2_gain) * rtn_lp


def test_codes_on_the_grid_and_ragged_last_group() -> None:
    w = _heavy_tailed(48, 200)  # 200 = 128 + 72: a ragged last group
    cfg = HqqConfig(bits=3, group_size=128)
    q, scales, zeros = hqq_quantize_weight(w, cfg)
    assert zeros is not None
    assert q.dtype == torch.uint8 and q.shape == (48, 200) and int(q.max()) <= 7
    assert scales.shape == zeros.shape == (48, num_groups(200, 128))
    assert zeros.dtype == torch.uint8 and int(zeros.max()) <= 7
    assert bool((scales.float() > 0).all())
    # Codes are the nearest grid points of the stored (s, z): re-rounding gives them back.
    s = scales.float().repeat_interleave(128, dim=1)[:, :200]
    z = zeros.float().repeat_interleave(128, dim=1)[:, :200]
    assert torch.equal(torch.clamp(torch.round(w / s + z), 0, 7).to(torch.uint8), q)
    # The ragged group is fitted on its own 72 columns, no worse than RTN there.
    rtn = dequantize(*quantize_groups(w, 3, 128, symmetric=False), 128)
    hqq = dequantize(q, scales, zeros, 128)
    tail = slice(128, 200)
    assert _errors(w[:, tail], hqq[:, tail])[1] <= _errors(w[:, tail], rtn[:, tail])[1] * 1.001


def test_zero_weights_stay_zero() -> None:
    w = _heavy_tailed(32, 128)
    w[:, ::3] = 0.0  # pruned weights: an integer zero point keeps 0 on the grid
    hqq = dequantize(*hqq_quantize_weight(w, HqqConfig(bits=4)), 128)
    assert bool((hqq[:, ::3] == 0).all())


def _shrink_reference(v: float, beta: float, p: float) -> float:
    """sign(v)·max(|v| − |v|^(p−1)/β, 0), written out for one number."""
    if v == 0.0:
        return 0.0
    mag = abs(v) - abs(v) ** (p - 1) / beta
    return (1.0 if v > 0 else -1.0) * max(mag, 0.0)


def test_shrink_lp_matches_textbook_formula() -> None:
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 0.6, 2.0])
    ref = torch.tensor([_shrink_reference(v, 10.0, 0.7) for v in x.tolist()])
    assert torch.allclose(shrink_lp(x, beta=10.0, p=0.7), ref)
    assert ref[1] == 0.0 and ref[-1] > 0.0  # small errors are zeroed, large ones shrunk


def test_save_load_llama_identical(tmp_path, tiny_llama) -> None:
    result = sl.compress(tiny_llama, {"steps": [{"method": "hqq", "bits": 4, "group_size": 32}]})
    assert "model.layers.0.mlp.down_proj" in result.steps[0].modules
    assert "lm_head" not in result.steps[0].modules
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out = result.model(input_ids=ids).logits
        ref = tiny_llama(input_ids=ids).logits
        sl.save(result.model, tmp_path / "ck")
        loaded = sl.load(tmp_path / "ck")
        layer = loaded.model.layers[1].self_attn.q_proj
        assert isinstance(layer, QuantLinear) and not layer.symmetric and layer.bits == 4
        assert torch.equal(loaded(input_ids=ids).logits, out)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98


def test_layer_matches_hqq_maths() -> None:
    layer = nn.Linear(96, 40)
    model = sl.compress(nn.Sequential(layer, nn.Linear(40, 2)), [HqqConfig(bits=3, group_size=32)])
    quant = model.model[0]
    assert isinstance(quant, QuantLinear)
    expected = dequantize(*hqq_quantize_weight(layer.weight, HqqConfig(bits=3, group_size=32)), 32)
    assert torch.equal(quant.dequantized_weight(), expected)
    x = torch.randn(5, 96)
    assert torch.allclose(quant(x), x @ expected.t() + layer.bias, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"iterations": -1}, "iterations"), ({"lp_norm": 1.0}, "lp_norm"),
     ({"lp_norm": 0.0}, "lp_norm"), ({"beta": 0.0}, "beta"), ({"kappa": 0.5}, "kappa"),
     ({"bits": 9}, "bits"), ({"group_size": 0}, "group_size"), ({"symmetric": True}, "symmetric")],
)  # fmt: skip
def test_invalid_fields_raise_naming_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"hqq.{field}"):
        HqqConfig.from_dict(fields)


def test_config_defaults_and_round_trip() -> None:
    cfg = HqqConfig(bits=3, group_size=64, iterations=5)
    assert HqqConfig.from_dict(cfg.to_dict()) == cfg
    assert not HqqConfig().symmetric and not HqqConfig.needs_calibration
    assert HqqConfig().lp_norm == 0.7
