"""Layer fallback by measured sensitivity (``quantize/fallback.py``): the ranking, the search
for the fewest switched layers against brute force, the held-out split, and the output
cosine against a by-hand computation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimline.quantize.fallback import (
    fall_back,
    output_cosine,
    rank_by_gain,
    split_off_checks,
)


class _Marked(nn.Module):
    """A layer that is either 'risky' (costs its penalty) or 'safe' (costs nothing)."""

    def __init__(self, penalty: float, safe: bool) -> None:
        super().__init__()
        self.penalty, self.safe = penalty, safe


def _model(penalties: list[float]) -> nn.Module:
    return nn.ModuleDict({f"l{i}": _Marked(p, safe=False) for i, p in enumerate(penalties)})


def _quality(model: nn.Module) -> float:
    """1 minus the penalties of the risky layers (additive, like small independent errors),
    and an interaction: l0 and l1 both risky cost 0.05 more."""
    layers = {n: m for n, m in model.named_children()}
    q = 1.0 - sum(m.penalty for m in layers.values() if not m.safe)
    if "l1" in layers and not layers["l0"].safe and not layers["l1"].safe:
        q -= 0.05
    return q


def _brute_force_fewest(penalties: list[float], target: float) -> int:
    names = [f"l{i}" for i in range(len(penalties))]
    for k in range(len(names) + 1):
        for chosen in itertools.combinations(names, k):
            model = _model(penalties)
            for n in chosen:
                model.get_submodule(n).safe = True
            if _quality(model) >= target:
                return k
    return len(names)


def test_rank_by_gain_best_first_ties_in_model_order() -> None:
    assert rank_by_gain({"a": 0.9, "b": 0.95, "c": 0.9, "d": 0.99}) == ["d", "b", "a", "c"]


@pytest.mark.parametrize("target", [0.97, 0.9, 0.8, 0.6])
def test_fewest_layers_equal_brute_force(target: float) -> None:
    penalties = [0.02, 0.01, 0.08, 0.0, 0.05, 0.1, 0.03]
    model = _model(penalties)
    safer = {n: _Marked(0.0, safe=True) for n, _ in model.named_children()}
    switched, reached = fall_back(model, safer, lambda: _quality(model), target)
    assert reached >= target and reached == pytest.approx(_quality(model))
    assert len(switched) == _brute_force_fewest(penalties, target)
    # what the model holds is what was returned
    assert {n for n, m in model.named_children() if m.safe} == set(switched)


def test_nothing_switched_when_the_model_already_meets_the_target() -> None:
    model = _model([0.001, 0.002])
    safer = {n: _Marked(0.0, safe=True) for n, _ in model.named_children()}
    assert fall_back(model, safer, lambda: _quality(model), 0.9) == ([], _quality(model))
    assert not any(m.safe for m in model.children())


def test_unreachable_target_switches_all_and_says_so() -> None:
    model = _model([0.1, 0.2, 0.3])
    # the safer forms still cost something: the target cannot be met
    safer = {n: _Marked(0.05, safe=False) for n, _ in model.named_children()}
    switched, reached = fall_back(model, safer, lambda: _quality(model), 0.99)
    assert sorted(switched) == ["l0", "l1", "l2"] and reached < 0.99
    assert all(model.get_submodule(n) is safer[n] for n in safer)


def _batch(lengths: list[int], width: int = 8) -> dict[str, torch.Tensor]:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": torch.arange(len(lengths) * width).reshape(-1, width) % 5,
            "attention_mask": mask}


def test_split_holds_out_the_last_quarter_and_caps_positions() -> None:
    batches = [_batch([8, 3]) for _ in range(8)]
    fit, check = split_off_checks(batches)
    assert fit == batches[:6] and check == batches[6:]
    fit, check = split_off_checks(batches, positions=5)  # one batch has 11 real tokens
    assert fit == batches[:7] and check == batches[7:]
    fit, check = split_off_checks(batches[:3])
    assert fit == batches[:2] and check == batches[2:3]
    one = batches[:1]
    assert split_off_checks(one) == (one, one)


class _TokenModel(nn.Module):
    """(B, T) ids -> (B, T, V) logits, a plain function of the ids."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 6)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.embed(input_ids) * self.scale
        return out + 0.3 * torch.sin(out * 7.0) * (self.scale != 1.0)


def test_output_cosine_is_per_item_over_real_tokens() -> None:
    batches = [_batch([8, 3]), _batch([5, 1, 7])]
    reference_model, model = _TokenModel(), _TokenModel(scale=1.5)
    with torch.no_grad():
        reference = [reference_model(**b) for b in batches]
        expected = []
        for b, ref in zip(batches, reference, strict=True):
            out = model(**b)
            for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
                # padding is dropped, the real positions of one item are one vector
                expected.append(F.cosine_similarity(ref[i, :n].flatten(), out[i, :n].flatten(),
                                                    dim=0))
    got = output_cosine(model, batches, reference)
    assert got == pytest.approx(float(torch.stack(expected).double().mean()), abs=1e-6)
    assert got < 0.999
    assert output_cosine(reference_model, batches, reference) == pytest.approx(1.0)
