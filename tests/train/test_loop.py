"""The training loop's pieces that need no process group (two ranks: tests/quantize/test_qat)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimline.train.loop import average_gradients, batch_order, train_loop


@pytest.mark.parametrize(("n", "length"), [(1, 3), (3, 7), (5, 5)])
def test_batch_order_visits_every_batch_once_per_epoch(n: int, length: int) -> None:
    order = batch_order(n, length, seed=3)
    assert len(order) == length and order == batch_order(n, length, seed=3)
    for start in range(0, length - n + 1, n):  # each full epoch is a permutation
        assert sorted(order[start:start + n]) == list(range(n))


def test_one_process_fills_missing_gradients_with_zeros() -> None:
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    (2 * used).sum().backward()
    average_gradients([used, unused], world=1)
    assert torch.equal(used.grad, torch.full((3,), 2.0))
    assert torch.equal(unused.grad, torch.zeros(2))


def test_loop_minimises_and_rejects_a_non_finite_loss() -> None:
    target = torch.tensor([1.0, -2.0, 0.5])
    p = nn.Parameter(torch.zeros(3))
    seen: list[int] = []

    def loss(index: int) -> torch.Tensor:
        seen.append(index)
        return (p - target).pow(2).sum()

    losses = train_loop([{"params": [p], "lr": 0.1}], loss, 4, steps=200, seed=0, name="t")
    assert losses[-1] < 1e-3 * losses[0]  # the least-squares optimum is p = target
    assert sorted(seen[:4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="t: the loss became nan at step 0; lower lr"):
        train_loop([{"params": [p], "lr": 0.1}], lambda _: p.sum() * float("nan"), 1, steps=2,
                   seed=0, name="t")  # fmt: skip
