from __future__ import annotations

import pytest
import torch

from slimline.prune.masks import global_masks, nm_mask, parse_pattern, unstructured_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_exact_count_and_lowest(sparsity: float) -> None:
    scores = torch.rand(37, 53)
    mask = unstructured_mask(scores, sparsity)
    k = round(sparsity * scores.numel())
    assert int((~mask).sum()) == k
    if 0 < k < scores.numel():
        assert scores[~mask].max() <= scores[mask].min()


def test_unstructured_ties_still_exact() -> None:
    scores = torch.zeros(10, 10)
    assert int((~unstructured_mask(scores, 0.37)).sum()) == 37


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_pattern_exact_and_top_n(pattern: str) -> None:
    n, m = parse_pattern(pattern)
    scores = torch.rand(16, 64)
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(16, 64 // m, m)
    assert bool((groups.sum(-1) == n).all())
    # brute force: in each group the kept ones are the N largest
    s = scores.reshape(16, 64 // m, m)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, s).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_width_error() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(4, 6), 2, 4)


@pytest.mark.parametrize("bad", ["2-4", "4:4", "0:4", "a:b", "5:4"])
def test_parse_pattern_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_global_threshold_matches_concatenated_reference() -> None:
    a, b = torch.rand(8, 8) * 0.1, torch.rand(4, 16)
    masks = global_masks([a, b], 0.5)
    total_pruned = int((~masks[0]).sum() + (~masks[1]).sum())
    assert total_pruned == round(0.5 * (a.numel() + b.numel()))
    # the small-valued layer loses more than half
    assert (~masks[0]).float().mean() > 0.5 > (~masks[1]).float().mean()
