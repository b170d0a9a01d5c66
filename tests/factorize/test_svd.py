"""``svd``: rank arithmetic against brute force, break-even refusal, exact reconstruction,
parameter counts, GPT-2 Conv1D, and checkpoints (alone and under ``rtn``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.factorize.layers import LowRankLinear
from slimline.factorize.ranks import (
    break_even_rank,
    factor_params,
    max_saving_rank,
    rank_for_energy,
    rank_for_ratio,
)
from tests.conftest import TinyMLP


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("n", "k"), [(64, 32), (7, 5), (10, 10), (1, 9), (300, 17)])
def test_ranks_match_brute_force(n: int, k: int) -> None:
    saving = [r for r in range(0, min(n, k) + 1) if r * (n + k) < n * k]
    assert max_saving_rank(n, k) == max(saving)
    assert break_even_rank(n, k) == pytest.approx(n * k / (n + k))
    for ratio in (0.05, 0.2, 0.5, 0.8, 0.99):
        fits = [r for r in range(0, min(n, k) + 1) if r * (n + k) <= ratio * n * k]
        assert rank_for_ratio(n, k, ratio) == max(fits)


def test_rank_for_energy_is_the_least_rank_reaching_it() -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])
    total = float((s**2).sum())
    for energy in (0.1, 0.5, 0.7, 0.9, 0.99, 1.0):
        brute = min(r for r in range(1, 6) if float((s[:r] ** 2).sum()) >= energy * total - 1e-9)
        assert rank_for_energy(s, energy) == brute


def test_full_energy_reproduces_a_low_rank_layer() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():  # rank 4 < break-even 27.4: factorizing at full energy saves weights
        model[0].weight.copy_(torch.randn(64, 4, generator=g) @ torch.randn(4, 48, generator=g))
    x = torch.randn(16, 48, generator=g)
    out = sl.compress(model, {"steps": [{"method": "svd", "energy": 1.0}]}).model
    assert isinstance(out[0], LowRankLinear) and out[0].rank == 4
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_ratio_gives_the_truncated_svd_and_drops_parameters(tiny_mlp: TinyMLP) -> None:
    out = sl.compress(tiny_mlp, {"steps": [{"method": "svd", "ratio": 0.3}]}).model
    saved = 0
    for name in ("fc1", "fc2"):
        dense, layer = getattr(tiny_mlp, name), getattr(out, name)
        n, k = dense.weight.shape
        r = rank_for_ratio(n, k, 0.3)
        assert isinstance(layer, LowRankLinear) and layer.rank == r
        u, s, vh = torch.linalg.svd(dense.weight.double())
        reference = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart–Young: the best rank-r approximation
        got = layer.second.weight.double() @ layer.first.weight.double()
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.second.bias, dense.bias)
        saved += n * k - factor_params(n, k, r)
    assert _params(tiny_mlp) - _params(out) == saved > 0
    assert isinstance(out.head, nn.Linear)  # the output head is not a default target


def test_rank_at_break_even_is_refused_naming_it(tiny_mlp: TinyMLP) -> None:
    before = copy.deepcopy(tiny_mlp.state_dict())
    # fc1 is 64×32: break-even 21.33; rank 22 would store more than the dense layer.
    with pytest.raises(ValueError, match=r"svd\.rank: 22 .*fc1.*break-even rank is 21\.33"):
        sl.compress(tiny_mlp, {"steps": [{"method": "svd", "rank": 22}]}, inplace=True)
    for k, v in tiny_mlp.state_dict().items():
        assert torch.equal(v, before[k])
    out = sl.compress(tiny_mlp, {"steps": [{"method": "svd", "rank": 21}]}).model
    assert out.fc1.rank == 21 and _params(out) < _params(tiny_mlp)


@pytest.mark.parametrize(("step", "field"), [
    ({"rank": 4, "ratio": 0.5}, "ratio"), ({"ratio": 0.5, "energy": 0.9}, "energy"),
    ({"ratio": 1.0}, "ratio"), ({"ratio": 0.0}, "ratio"), ({"energy": 1.5}, "energy"),
    ({"rank": 0}, "rank"), ({"allocation": "greedy"}, "allocation"),
])
def test_bad_fields_are_refused(step: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"svd\.{field}"):
        sl.Recipe.from_dict({"steps": [{"method": "svd", **step}]})


def test_too_small_ratio_is_refused(tiny_mlp: TinyMLP) -> None:
    with pytest.raises(ValueError, match=r"svd\.ratio: 0\.01 keeps less than rank 1"):
        sl.compress(tiny_mlp, {"steps": [{"method": "svd", "ratio": 0.01}]})


def test_gpt2_conv1d_is_factorized_from_its_transposed_weight() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    ).eval()
    out = sl.compress(model, {"steps": [{"method": "svd", "ratio": 0.5}]}).model
    dense = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in 64, out 256)
    assert isinstance(dense, Conv1D)
    layer = out.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear)
    assert (layer.in_features, layer.out_features) == (64, 256)
    w = dense.weight.t().double()  # (N, K)
    r = layer.rank
    u, s, vh = torch.linalg.svd(w)
    x = torch.randn(3, 5, 64)
    expected = x.double() @ ((u[:, :r] * s[:r]) @ vh[:r]).t() + dense.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, Conv1D) for m in out.modules())
    ids = torch.randint(0, 80, (2, 8))
    assert out(input_ids=ids).logits.shape == model(input_ids=ids).logits.shape


@pytest.mark.parametrize("steps", [
    [{"method": "svd", "ratio": 0.4}],
    [{"method": "svd", "ratio": 0.4}, {"method": "rtn", "bits": 4, "group_size": 16}],
])
def test_save_load_is_exact_and_factors_compose(steps: list, tiny_mlp: TinyMLP, tmp_path) -> None:
    out = sl.compress(tiny_mlp, {"steps": steps}).model
    if len(steps) > 1:  # rtn reached the factors, which are ordinary Linear layers
        assert type(out.fc1.first).__name__ == type(out.fc1.second).__name__ == "QuantLinear"
    sl.save(out, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=TinyMLP())
    x = torch.randn(8, 32)
    assert torch.equal(loaded(x), out(x))
    assert type(loaded.fc1.first) is type(out.fc1.first)
