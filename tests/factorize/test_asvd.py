"""``asvd``: scaling by activation magnitude (arXiv 2312.05821) beats plain SVD when some
input channels carry outliers; the scaling is folded back exactly; the padding is ignored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.factorize.asvd import asvd_decompose_scaled, asvd_scales


def _outlier_inputs(tokens: int = 512, k: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :3] *= 40.0  # three outlier channels, as in LLM activations (LLM.int8, arXiv 2208.07339)
    return x


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def test_full_rank_asvd_reproduces_the_weight() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 7, generator=g, dtype=torch.float64)
    scales = asvd_scales(torch.rand(7, generator=g, dtype=torch.float64), 0.5)
    torch.testing.assert_close(asvd_decompose_scaled(w, scales).reconstruct(7), w)


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_asvd_beats_svd_on_outlier_channels(rank: int) -> None:
    model, x = _model(), _outlier_inputs()
    batches = list(x.reshape(4, 128, 48))
    target = {"include": ["0"]}
    errors = {}
    for method in ("svd", "asvd"):
        step = {"method": method, "rank": rank, "targets": target}
        out = sl.compress(model, {"steps": [step]}, calibration=batches).model
        errors[method] = float((out[0](x) - model[0](x)).norm())
    assert errors["asvd"] < 0.8 * errors["svd"]


def test_scales_are_the_mean_absolute_input_of_real_tokens() -> None:
    from slimline.core.calibration import RealTokens
    from slimline.factorize.base import FactorStats

    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    stats = FactorStats(6, hessian=False, abs_mean=True)
    tokens = RealTokens()
    tokens.mask = mask
    stats.add_batch(tokens.keep(x))
    torch.testing.assert_close(stats.abs_mean, x[mask].abs().mean(0).double())
    torch.testing.assert_close(asvd_scales(stats.abs_mean, 0.5), stats.abs_mean.sqrt())


def test_alpha_is_validated() -> None:
    with pytest.raises(ValueError, match=r"asvd\.alpha"):
        sl.Recipe.from_dict({"steps": [{"method": "asvd", "alpha": 0.0}]})


@pytest.mark.parametrize(("alpha", "rank"), [(0.5, 5), (1.0, 12)])
def test_layer_is_the_truncated_svd_of_the_scaled_weight(alpha: float, rank: int) -> None:
    # Reference, from the paper's definition (arXiv 2312.05821 §3.2), computed here: the
    # rank-r truncation of W·diag(s), s = mean|x|^α over the calibration tokens, with
    # diag(s)⁻¹ folded back — W_r = U_r Σ_r V_rᵀ diag(1/s).
    model = _model().double()
    x = _outlier_inputs().double()
    step = {"method": "asvd", "rank": rank, "alpha": alpha, "targets": {"include": ["0"]}}
    out = sl.compress(model, {"steps": [step]}, calibration=list(x.reshape(4, 128, 48))).model
    w, bias = model[0].weight.detach(), model[0].bias.detach()
    s = x.abs().mean(0).pow(alpha)  # (K,)
    u, sigma, vh = torch.linalg.svd(w * s[None, :], full_matrices=False)
    w_r = (u[:, :rank] * sigma[:rank]) @ vh[:rank] / s[None, :]
    layer = out[0]
    assert layer.rank == rank
    torch.testing.assert_close(layer.second.weight @ layer.first.weight, w_r, rtol=1e-9, atol=1e-9)
    probe = torch.randn(7, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(probe), probe @ w_r.t() + bias, rtol=1e-9, atol=1e-9)
