from __future__ import annotations

import pytest
import torch

from slimline.prune.schedule import CubicSchedule, GradualPruner, cubic_sparsity


def test_cubic_formula_points() -> None:
    kw = {"begin": 100, "end": 1100, "initial": 0.0, "final": 0.8}
    assert cubic_sparsity(0, **kw) == 0.0
    assert cubic_sparsity(100, **kw) == 0.0
    assert cubic_sparsity(1100, **kw) == pytest.approx(0.8)
    assert cubic_sparsity(5000, **kw) == pytest.approx(0.8)
    # half way: s_f (1 - (1/2)^3) = 0.8 * 7/8
    assert cubic_sparsity(600, **kw) == pytest.approx(0.7)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        CubicSchedule(final=1.0, begin=0, end=10)
    with pytest.raises(ValueError):
        CubicSchedule(final=0.5, begin=10, end=10)


def test_gradual_pruning_during_training(tiny_mlp) -> None:
    schedule = CubicSchedule(final=0.75, begin=0, end=40, frequency=10)
    pruner = GradualPruner(tiny_mlp, schedule)
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    for step in range(60):
        loss = torch.nn.functional.cross_entropy(tiny_mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        target = pruner.step(step)
        for layer in (tiny_mlp.fc1, tiny_mlp.fc2):
            zeros = float((layer.weight == 0).float().mean())
            assert zeros >= min(target, schedule.sparsity(step - step % 10)) - 1e-3
    assert float((tiny_mlp.fc2.weight == 0).float().mean()) == pytest.approx(0.75, abs=1e-3)
    assert not (tiny_mlp.head.weight == 0).any()
