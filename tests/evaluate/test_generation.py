"""The generation metric: greedy decode tokens/s, and speculation's acceptance over the timed
calls only."""

from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.evaluate.generation import can_generate, measure_generation, prompt_of


def test_prompt_of_strips_padding() -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert prompt_of({"input_ids": ids, "attention_mask": mask}).tolist() == [[5, 6, 7]]
    with pytest.raises(ValueError, match="all padding"):
        prompt_of({"input_ids": ids, "attention_mask": torch.zeros_like(mask)})
    with pytest.raises(ValueError, match="input_ids"):
        prompt_of(ids)  # type: ignore[arg-type]


def test_generation_counts_timed_calls_only(tiny_llama: torch.nn.Module) -> None:
    spec = sl.compress(tiny_llama, {"steps": [{"method": "speculative", "mode": "prompt_lookup"}]}).model
    assert can_generate(tiny_llama) and can_generate(spec)
    assert not can_generate(torch.nn.Linear(2, 2))
    prompt = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6, 3, 4]])
    figures = measure_generation({"baseline": tiny_llama, "model": spec}, prompt, runs=3, warmup=1,
                                 new_tokens=8)
    assert set(figures["baseline"]) == {"generate_tokens_per_s"}
    assert figures["baseline"]["generate_tokens_per_s"] > 0
    stats = spec.speculative_stats
    assert stats.calls == 3  # the warm-up call was reset away
    assert stats.new_tokens == 3 * 8
    assert figures["model"]["acceptance_rate"] == pytest.approx(stats.accepted / stats.drafted)
    assert 1.0 <= figures["model"]["tokens_per_target_forward"] <= 1 + spec.slimline_speculative.gamma


def test_evaluate_reports_generation_for_speculative_models(tiny_llama: torch.nn.Module) -> None:
    spec = sl.compress(tiny_llama, {"steps": [{"method": "speculative", "mode": "prompt_lookup"}]}).model
    ids = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6], [0, 0, 7, 8, 9, 7, 8, 9]])
    batches = [{"input_ids": ids, "attention_mask": (ids != 0).long()}]
    report = sl.evaluate(spec, data=batches, baseline=tiny_llama, runs=2, warmup=1,
                         metrics=["latency", "generation"])
    model, baseline = report["models"]["model"], report["models"]["baseline"]
    assert model["generate_tokens_per_s"] > 0 and baseline["generate_tokens_per_s"] > 0
    assert 0.0 <= model["acceptance_rate"] <= 1.0
    assert "acceptance_rate" not in baseline
    with pytest.raises(ValueError, match="generation needs causal LMs"):
        sl.evaluate(torch.nn.Linear(4, 4), data=[torch.randn(2, 4)], metrics=["generation"])
