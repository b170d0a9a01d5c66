from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.core.statistics import InputStats
from slimline.prune.importance import magnitude_score
from slimline.prune.masks import row_masks, unstructured_mask
from slimline.prune.sparsegpt import sparsegpt_prune_weight


def _layer_problem(out: int = 48, inp: int = 64, tokens: int = 512):
    """A weight and inputs with correlated, outlier-heavy features, as in real LLM layers."""
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    scale = torch.ones(inp)
    scale[:4] = 20.0  # a few outlier features (arXiv 2208.07339)
    x = (torch.randn(tokens, inp, generator=g) @ mix + 0.3 * torch.randn(tokens, inp, generator=g)) * scale
    w = torch.randn(out, inp, generator=g)
    stats = InputStats(inp, hessian=True)
    for chunk in x.split(128):
        stats.add_batch(chunk)
    return w, x, stats


def _out_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.t() - x @ w_hat.t()) ** 2).mean())


def test_input_stats_match_direct_formulas() -> None:
    _, x, stats = _layer_problem()
    torch.testing.assert_close(stats.input_norm, x.norm(dim=0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)


def test_sparsegpt_exact_sparsity_and_beats_magnitude() -> None:
    w, x, stats = _layer_problem()
    pruned = sparsegpt_prune_weight(w, stats.hessian, sparsity=0.5, block_size=16)
    assert int((pruned == 0).sum()) == w.numel() // 2
    magnitude = w * unstructured_mask(magnitude_score(w), 0.5)
    assert _out_error(w, pruned, x) < 0.5 * _out_error(w, magnitude, x)


def test_sparsegpt_nm_pattern_and_lazy_blocks_equal_column_by_column() -> None:
    w, _, stats = _layer_problem()
    lazy = sparsegpt_prune_weight(w, stats.hessian, sparsity=0.0, pattern="2:4", block_size=32)
    direct = sparsegpt_prune_weight(w, stats.hessian, sparsity=0.0, pattern="2:4", block_size=4)
    torch.testing.assert_close(lazy, direct, rtol=1e-4, atol=1e-4)
    groups = (lazy != 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert bool((groups <= 2).all())


def test_sparsegpt_matches_textbook_obs_single_weight() -> None:
    """Pruning one weight: the OBS update δ = −w_q/[H⁻¹]_qq · H⁻¹_{:,q} (Hassibi & Stork)."""
    w, _, stats = _layer_problem(out=1, inp=8, tokens=64)
    w[0, 0] = 1e-3  # the least salient weight, in the first column processed
    h = stats.hessian
    hinv = torch.linalg.inv(h + torch.eye(8) * 0.01 * torch.diag(h).mean())
    ref = w[0] - w[0, 0] / hinv[0, 0] * hinv[:, 0]
    ours = sparsegpt_prune_weight(w, h, sparsity=1 / 8, block_size=8)[0]
    assert ours[0] == 0 and int((ours == 0).sum()) == 1
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_wanda_row_masks_beat_magnitude_with_outliers() -> None:
    w, x, stats = _layer_problem()
    from slimline.prune.importance import wanda_score

    keep = row_masks(wanda_score(w, stats.input_norm), 0.5)
    assert int((~keep).sum()) == w.numel() // 2
    assert bool(((~keep).sum(1) == w.shape[1] // 2).all())
    magnitude = w * unstructured_mask(magnitude_score(w), 0.5)
    assert _out_error(w, w * keep, x) < _out_error(w, magnitude, x)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_calibrated_pruners_on_llama(method: str, spec: dict, tiny_llama, token_batches) -> None:
    recipe = {"steps": [{"method": method, **spec}]}
    with pytest.raises(ValueError, match="needs calibration data"):
        sl.compress(tiny_llama, recipe)
    result = sl.compress(tiny_llama, recipe, calibration=token_batches)
    model = result.model
    assert len(result.steps[0].modules) == 14
    for name in result.steps[0].modules:
        w = model.get_submodule(name).weight
        if "pattern" in spec:
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
        else:
            assert int((w == 0).sum()) == w.numel() // 2
    with torch.no_grad():
        logits = model(**token_batches[0]).logits
    assert torch.isfinite(logits).all()


def test_sparsegpt_end_to_end_closer_than_magnitude(tiny_llama, token_batches) -> None:
    def kl(model: torch.nn.Module) -> float:
        with torch.no_grad():
            p = tiny_llama(**token_batches[0]).logits.log_softmax(-1)
            q = model(**token_batches[0]).logits.log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    mag = sl.compress(tiny_llama, {"steps": [{"method": "magnitude", "sparsity": 0.6}]}).model
    sgpt = sl.compress(
        tiny_llama, {"steps": [{"method": "sparsegpt", "sparsity": 0.6}]}, calibration=token_batches
    ).model
    assert kl(sgpt) < kl(mag)
