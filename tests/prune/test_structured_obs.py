"""Greedy OBS unit selection (``prune/structured_obs.py``) against brute-force least squares."""

from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.prune.structured import wanda_unit_score
from slimline.prune.structured_obs import Consumer, damped_inverse, obs_keep, unit_errors


def _data(n: int = 300, d: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, d + 1) correlated inputs with the constant 1 last (it carries the bias)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                        dtype=torch.float64)
    return torch.cat([x + 0.3, torch.ones(n, 1, dtype=torch.float64)], dim=1)


def _residual(x: torch.Tensor, weight: torch.Tensor, drop: list[int]) -> float:
    """Brute force: Σ‖W x − W' x_R‖² over the data, W' the least-squares refit on the rest."""
    keep = [j for j in range(x.shape[1]) if j not in drop]
    y = x @ weight.T
    fit = torch.linalg.lstsq(x[:, keep], y).solution
    return float((y - x[:, keep] @ fit).pow(2).sum())


def _cols(units: list[int], width: int) -> list[int]:
    return [u * width + k for u in units for k in range(width)]


def test_unit_errors_equal_the_least_squares_residual() -> None:
    x = _data(d=6)  # 3 units of width 2, then the bias column
    weight = torch.randn(4, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = unit_errors(weight, damped_inverse(x.T @ x, 0.0), n_units=3, width=2)
    expected = torch.tensor([_residual(x, weight, _cols([u], 2)) for u in range(3)], dtype=torch.float64)
    torch.testing.assert_close(errors, expected, rtol=1e-8, atol=1e-8)


def test_greedy_removal_matches_brute_force_greedy_least_squares() -> None:
    x = _data(d=8, seed=2)
    weight = torch.randn(5, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    removed: list[int] = []
    for _ in range(4):  # the textbook greedy: try every unit, refit by lstsq, keep the best
        left = [u for u in range(8) if u not in removed]
        removed.append(min(left, key=lambda u: _residual(x, weight, [*removed, u])))
    kept = obs_keep([Consumer(weight, x.T @ x, 1)], 8, 4, rounds=4, dampening=0.0)
    assert kept.tolist() == sorted(set(range(8)) - set(removed))


def test_a_duplicated_unit_goes_first_where_per_unit_scores_keep_it() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # unit 1 carries exactly what unit 0 does
    x = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64) * 0.1
    weight[:, :2] = 2.0  # the duplicated pair has the largest weights
    wanda = wanda_unit_score(weight[:, :5], x[:, :5].norm(dim=0), 5)
    assert set(torch.argsort(wanda)[-2:].tolist()) == {0, 1}  # per-unit: the two most important
    kept = obs_keep([Consumer(weight, x.T @ x, 1)], 5, 1, dampening=1e-8)
    assert len(set(kept.tolist()) & {0, 1}) == 1  # OBS: one of them, at no cost after the refit


def test_units_sum_their_consumers_errors_and_partitions_lose_alike() -> None:
    x = _data(d=8, seed=5)
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(4, 9, generator=g, dtype=torch.float64)
    weight[:, 4:8] *= 100  # every unit of the second partition far costlier
    kept = obs_keep([Consumer(weight, x.T @ x, 1)], 8, 4, partitions=2, dampening=0.0)
    assert sum(k < 4 for k in kept.tolist()) == 2 and sum(k >= 4 for k in kept.tolist()) == 2
    # two consumers (each with its own bias column): the errors add up, as one stacked layer's
    other = torch.randn(2, 9, generator=g, dtype=torch.float64)
    both = obs_keep([Consumer(weight, x.T @ x, 1), Consumer(other, x.T @ x, 1)], 8, 3,
                    rounds=3, dampening=0.0)
    stacked = obs_keep([Consumer(torch.cat([weight, other]), x.T @ x, 1)], 8, 3, rounds=3,
                       dampening=0.0)
    assert both.tolist() == stacked.tolist()
    with pytest.raises(ValueError, match="partitions"):
        obs_keep([Consumer(weight, x.T @ x, 1)], 8, 3, partitions=2)


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def _tokens() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 7:] = 0  # padded rows stay out of the statistics
        out.append({"input_ids": torch.randint(0, 96, (4, 12), generator=g), "attention_mask": mask})
    return out


def test_obs_prunes_bert_and_errors_name_the_field() -> None:
    model, batches = _bert(), _tokens()
    step = {"method": "structured", "sparsity": 0.5, "importance": "obs"}
    pruned = sl.compress(model, {"steps": [step]}, calibration=batches).model
    assert pruned.config.intermediate_size == 64
    assert pruned.encoder.layer[0].attention.self.query.weight.shape == (32, 64)
    with torch.no_grad():
        assert torch.isfinite(pruned(**batches[0]).last_hidden_state).all()
    with pytest.raises(ValueError, match="calibration"):
        sl.compress(model, {"steps": [step]})
    with pytest.raises(ValueError, match=r"structured\.importance.*conv channels"):
        sl.compress(model, {"steps": [{**step, "units": ["channels"]}]}, calibration=batches)
