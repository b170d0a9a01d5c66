from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.prune.owl import outlier_ratio, owl_sparsities


def test_outlier_ratio_direct() -> None:
    scores = torch.tensor([1.0] * 98 + [100.0, 200.0])
    # mean = (98 + 300) / 100 = 3.98; entries above 5 × 3.98 = 19.9: two of 100
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.02)


def test_owl_sparsities_mean_spread_and_order() -> None:
    ratios = [0.01, 0.05, 0.02, 0.10]
    s = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)
    # more outliers → lower sparsity, monotone
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)


def test_owl_equal_ratios_is_uniform() -> None:
    assert owl_sparsities([0.03, 0.03], 0.4, 0.08) == pytest.approx([0.4, 0.4])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_end_to_end(method: str, tiny_llama, token_batches) -> None:
    with torch.no_grad():  # make block 1 outlier-heavy so OWL must spare it
        tiny_llama.model.layers[1].mlp.up_proj.weight[:, :3] *= 40
    recipe = {"steps": [{"method": method, "sparsity": 0.5, "owl": True}]}
    if method == "magnitude":
        with pytest.raises(ValueError, match="'magnitude' needs calibration data"):
            sl.compress(tiny_llama, recipe)
    model = sl.compress(tiny_llama, recipe, calibration=token_batches).model
    by_block = []
    for i in range(2):
        ws = [m.weight for n, m in model.model.layers[i].named_modules() if isinstance(m, torch.nn.Linear)]
        by_block.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    assert by_block[1] < 0.5 < by_block[0]
    assert sum(by_block) / 2 == pytest.approx(0.5, abs=0.01)


def test_owl_rejects_nm() -> None:
    with pytest.raises(ValueError, match="wanda.owl"):
        sl.Recipe.from_dict({"steps": [{"method": "wanda", "pattern": "2:4", "owl": True}]})
