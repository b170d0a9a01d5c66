"""``tucker``: Tucker-2 of Conv2d (arXiv 1511.06530) — exact at full ranks, HOOI improves on
HOSVD, ratio arithmetic against brute force, digits-cnn smaller and reloadable."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.factorize.layers import TuckerConv2d
from slimline.factorize.tucker import tucker2, tucker_layer, tucker_params, tucker_ranks_for_ratio


@pytest.mark.parametrize(("stride", "padding", "dilation", "bias"),
                         [(1, 1, 1, True), (2, 0, 1, False), (1, 2, 2, True)])
def test_full_ranks_reproduce_the_conv(stride: int, padding: int, dilation: int, bias: bool) -> None:
    conv = nn.Conv2d(6, 10, (3, 3), stride=stride, padding=padding, dilation=dilation, bias=bias)
    layer = tucker_layer(conv, 10, 6, iterations=2)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def _error(w: torch.Tensor, r_out: int, r_in: int, iterations: int) -> float:
    u_out, core, u_in = tucker2(w, r_out, r_in, iterations)
    rebuilt = torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in)
    return float((rebuilt - w.double()).norm())


def test_hooi_lowers_the_hosvd_error() -> None:
    w = torch.randn(16, 12, 3, 3)
    errors = [_error(w, 6, 5, it) for it in (0, 1, 3, 10)]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errors))
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (16, 1, 3, 3), (64, 64, 5, 5)])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_ratio_ranks_are_the_largest_that_fit(shape: tuple, ratio: float) -> None:
    c_out, c_in = shape[:2]
    fits = [r for r in range(1, c_out + 1)
            if tucker_params(shape, r, min(c_in, max(1, round(r * c_in / c_out))))
            <= ratio * math.prod(shape)]
    found = tucker_ranks_for_ratio(shape, ratio)
    assert (found is None) == (not fits)
    if fits:
        assert found[0] == max(fits)


def test_digits_cnn_at_half_the_conv_weights(tmp_path) -> None:
    from slimline.models import load_builtin

    built = load_builtin("digits-cnn")
    model = built.model
    out = sl.compress(model, {"steps": [{"method": "tucker", "ratio": 0.5}]}).model
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name in convs:
        dense, layer = model.get_submodule(name), out.get_submodule(name)
        assert isinstance(layer, TuckerConv2d)
        kernel = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("weight"))
        assert kernel <= 0.5 * dense.weight.numel()
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    batch = built.batches("test", batch_size=8, limit=1)[0]
    sl.save(out, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(batch["pixel_values"]), out(batch["pixel_values"]))


def test_models_without_convs_are_refused(tiny_mlp) -> None:
    with pytest.raises(ValueError, match=r"\(tucker\): TinyMLP has no Conv2d"):
        sl.compress(tiny_mlp, {"steps": [{"method": "tucker"}]})


def test_vbmf_ranks_find_a_low_rank_kernel_under_noise() -> None:
    g = torch.Generator().manual_seed(0)
    core = torch.randn(4, 3, 3, 3, generator=g) * 10
    u_out = torch.linalg.qr(torch.randn(24, 4, generator=g))[0]
    u_in = torch.linalg.qr(torch.randn(16, 3, generator=g))[0]
    clean = torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in)
    w = clean + 0.01 * torch.randn(clean.shape, generator=g)  # noise for VBMF to estimate
    model = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(w)
    out = sl.compress(model, {"steps": [{"method": "tucker", "rank": "vbmf"}]}).model
    assert out[0].ranks == (3, 4)  # (r_in, r_out) as constructed
    layer = out[0]
    rebuilt = torch.einsum("abkl,oa,ib->oikl", layer.core.weight, layer.last.weight[:, :, 0, 0],
                           layer.first.weight[:, :, 0, 0].t())
    # Truncating at the true ranks removes most of the noise: closer to the clean kernel.
    assert (rebuilt - clean).norm() < 0.5 * (w - clean).norm()


def _hosvd_reference(w: torch.Tensor, r_out: int, r_in: int) -> torch.Tensor:
    """Tucker-2 by truncated HOSVD (De Lathauwer et al. 2000), from the mode unfoldings:
    U_out, U_in the leading left singular vectors of W₍₀₎ (C_out, C_in·kh·kw) and
    W₍₁₎ (C_in, C_out·kh·kw); W' = W ×₀ U_out U_outᵀ ×₁ U_in U_inᵀ."""
    c_out, c_in = w.shape[:2]
    u_out = torch.linalg.svd(w.reshape(c_out, -1), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(w.permute(1, 0, 2, 3).reshape(c_in, -1), full_matrices=False)[0][:, :r_in]
    p_out, p_in = u_out @ u_out.t(), u_in @ u_in.t()  # projections: no sign ambiguity
    return torch.einsum("oikl,po,qi->pqkl", w, p_out, p_in)


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_hosvd_layer_matches_a_reference_from_the_unfoldings(
    stride: int, padding: int, dilation: int
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 10, 3, stride=stride, padding=padding,
                                    dilation=dilation)).double()
    step = {"method": "tucker", "ratio": 0.4, "iterations": 0}  # 0 sweeps: the HOSVD itself
    layer = sl.compress(model, {"steps": [step]}).model[0]
    assert isinstance(layer, TuckerConv2d)
    r_in, r_out = layer.ranks
    conv = model[0]
    reference = _hosvd_reference(conv.weight.detach(), r_out, r_in)
    rebuilt = torch.einsum("abkl,oa,bi->oikl", layer.core.weight, layer.last.weight[:, :, 0, 0],
                           layer.first.weight[:, :, 0, 0])
    torch.testing.assert_close(rebuilt, reference, rtol=1e-10, atol=1e-10)
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, reference, conv.bias, stride=stride, padding=padding,
                                          dilation=dilation)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_hooi_refines_the_hosvd_reference() -> None:
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    reference = float((_hosvd_reference(w, 5, 4) - w).norm())
    assert _error(w, 5, 4, 0) == pytest.approx(reference, rel=1e-12)
    assert _error(w, 5, 4, 5) < reference
