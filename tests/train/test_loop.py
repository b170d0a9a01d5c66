"""The training loop in one process: schedule, accumulation, precision, early stopping,
resumable checkpoints. Two processes: tests/train/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimline.train.loop import batch_order, train_loop, warmup_cosine
from slimline.train.options import LoopOptions


@pytest.mark.parametrize(("n", "length"), [(1, 3), (3, 7), (5, 5)])
def test_batch_order_visits_every_batch_once_per_epoch(n: int, length: int) -> None:
    order = batch_order(n, length, seed=3)
    assert len(order) == length and order == batch_order(n, length, seed=3)
    for start in range(0, length - n + 1, n):  # each full epoch is a permutation
        assert sorted(order[start:start + n]) == list(range(n))


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


def test_nan_mid_run_names_the_step_and_skips_its_update() -> None:
    p = nn.Parameter(torch.zeros(2))
    calls = []

    def loss(_: int) -> torch.Tensor:
        calls.append(1)
        scale = float("nan") if len(calls) == 4 else 1.0
        return (p - 1.0).pow(2).sum() * scale

    with pytest.raises(ValueError, match="at step 3"):
        train_loop([{"params": [p], "lr": 0.1}], loss, 1, steps=10, seed=0, name="t",
                   options=LoopOptions(optimizer="sgd"))  # fmt: skip
    # Three SGD steps on (p-1)² from 0 with the cosine factors, the fourth never applied.
    ref = torch.zeros(2)
    for t in range(3):
        ref = ref - 0.1 * warmup_cosine(t, 10, 0) * 2 * (ref - 1.0)
    torch.testing.assert_close(p.detach(), ref)


def test_warmup_cosine_schedule_reaches_the_optimizer() -> None:
    # With loss c·p, SGD moves p by -lr_t·c each step: p_T = -c·lr·Σ factor(t).
    steps, warmup, lr = 12, 4, 0.5
    factors = [warmup_cosine(t, steps, warmup) for t in range(steps)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up, then the cosine from 1
    assert factors[4] == 1.0 and math.isclose(factors[8], 0.5)
    c = torch.tensor([1.0, -3.0])
    p = nn.Parameter(torch.zeros(2))
    train_loop([{"params": [p], "lr": lr}], lambda _: (p * c).sum(), 1, steps=steps, seed=0,
               name="t", options=LoopOptions(optimizer="sgd", warmup=warmup))  # fmt: skip
    torch.testing.assert_close(p.detach(), -c * lr * sum(factors))


def _regression(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(8, 1, generator=g)))
    return out


def _fit(batches, steps: int, **options) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)

    def loss(i: int) -> torch.Tensor:
        x, y = batches[i]
        return (layer(x) - y).pow(2).mean()

    losses = train_loop([{"params": list(layer.parameters()), "lr": 0.05}], loss, len(batches),
                        steps=steps, seed=0, name="fit", options=LoopOptions(**options))  # fmt: skip
    return losses, torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])


def test_accumulating_two_micro_batches_equals_one_batch_of_both() -> None:
    micro = _regression(8)
    order = batch_order(8, 2 * 10, seed=0)  # the micro-batches the loop will take
    joined = [(torch.cat([micro[order[2 * t]][0], micro[order[2 * t + 1]][0]]),
               torch.cat([micro[order[2 * t]][1], micro[order[2 * t + 1]][1]]))
              for t in range(10)]  # fmt: skip

    a_losses, a = _fit(micro, 10, accumulation=2)
    b_losses, b = _fit_in_order(joined, 10)
    torch.testing.assert_close(torch.tensor(a_losses), torch.tensor(b_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fit_in_order(batches, steps: int) -> tuple[list[float], torch.Tensor]:
    """One batch per step, in the given order (n_batches=steps, the order's first epoch
    visits each index once: map the loop's index to the step number)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)
    order = batch_order(steps, steps, seed=0)
    position = {index: t for t, index in enumerate(order)}

    def loss(i: int) -> torch.Tensor:
        x, y = batches[position[i]]
        return (layer(x) - y).pow(2).mean()

    losses = train_loop([{"params": list(layer.parameters()), "lr": 0.05}], loss, steps,
                        steps=steps, seed=0, name="fit")  # fmt: skip
    return losses, torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])


def test_bf16_master_weights_keep_updates_below_the_bf16_step() -> None:
    # bf16 has 8 significant bits: 1 + 1e-3 rounds back to 1. With float32 masters the
    # updates accumulate (SGD on c·p moves p by -lr·c·factor per step) and p is their sum.
    c, lr, steps = torch.tensor([0.5, 1.5]), 1e-3, 30  # updates < half the step below 1
    expected = torch.ones(2) - c * lr * sum(warmup_cosine(t, steps, 0) for t in range(steps))
    for masters in (True, False):
        p = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
        train_loop([{"params": [p], "lr": lr}], lambda _, p=p: (p.float() * c).sum(), 1, steps=steps,
                   seed=0, name="t", options=LoopOptions(optimizer="sgd", master_weights=masters))  # fmt: skip
        if masters:
            assert torch.equal(p.detach(), expected.to(torch.bfloat16))
        else:
            assert torch.equal(p.detach(), torch.ones(2, dtype=torch.bfloat16))  # lost


def test_bf16_autocast_trains_close_to_float32() -> None:
    batches = _regression(4)
    fp32, w32 = _fit(batches, 30)
    bf16, w16 = _fit(batches, 30, autocast=True)
    assert bf16[-1] < 0.5 * bf16[0]  # it trains
    # The matmuls round to bf16 (8 significant bits): the curves agree to about 1 %.
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.02, atol=0.0)
    torch.testing.assert_close(w16, w32, rtol=0.02, atol=0.01)


def test_early_stopping_keeps_the_best_evaluated_parameters() -> None:
    p = nn.Parameter(torch.zeros(1))
    held = iter([5.0, 3.0, 1.0, 2.0, 4.0, 6.0, 7.0])  # best after step 4 (before: 5.0)
    snapshots: list[float] = []

    def evaluate() -> float:
        snapshots.append(float(p))
        return next(held)

    losses = train_loop([{"params": [p], "lr": 0.1}], lambda _: -p.sum(), 1, steps=20, seed=0,
                        name="t", options=LoopOptions(optimizer="sgd", eval_every=2, patience=3),
                        evaluate=evaluate)  # fmt: skip
    assert len(losses) == 10  # evaluations at 0, 2, 4 (best), 6, 8, 10: the third miss stops
    assert float(p) == snapshots[2]


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path) -> None:
    batches = _regression(5)
    options = {"warmup": 2, "accumulation": 2, "weight_decay": 0.01}
    _, uninterrupted = _fit(batches, 9, **options)

    calls = []

    def crash_after(k: int):
        def loss(layer: nn.Linear, i: int) -> torch.Tensor:
            calls.append(i)
            if len(calls) > k:
                raise KeyboardInterrupt  # a killed run
            x, y = batches[i]
            return (layer(x) - y).pow(2).mean()
        return loss

    def run(loss_fn) -> torch.Tensor:
        torch.manual_seed(0)
        layer = nn.Linear(4, 1)
        train_loop([{"params": list(layer.parameters()), "lr": 0.05}],
                   lambda i: loss_fn(layer, i), len(batches), steps=9, seed=0, name="fit",
                   options=LoopOptions(**options, checkpoint_dir=str(tmp_path), checkpoint_every=2))  # fmt: skip
        return torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])

    with pytest.raises(KeyboardInterrupt):
        run(crash_after(11))  # dies in the 6th step; the last checkpoint is after the 4th
    calls.clear()
    resumed = run(crash_after(10**9))
    assert len(calls) == 2 * (9 - 4)  # only the steps after the checkpoint ran again
    assert torch.equal(resumed, uninterrupted)
    with pytest.raises(ValueError, match="checkpoint of another run"):
        _fit(batches, 7, **options, checkpoint_dir=str(tmp_path), checkpoint_every=1)


def test_resume_with_dropout_draws_what_the_uninterrupted_run_drew(tmp_path) -> None:
    # Each step reseeds from (seed, rank, step): no random state in the checkpoint, yet the
    # resumed run's dropout masks are the uninterrupted run's; the caller's state is kept.
    batches = _regression(3)

    def run(directory, crash_at: int | None) -> torch.Tensor:
        torch.manual_seed(0)
        layer = nn.Linear(4, 1)
        calls = []

        def loss(i: int) -> torch.Tensor:
            calls.append(i)
            if crash_at is not None and len(calls) > crash_at:
                raise KeyboardInterrupt
            x, y = batches[i]
            return (layer(nn.functional.dropout(x, 0.5)) - y).pow(2).mean()

        options = LoopOptions(checkpoint_dir=directory, checkpoint_every=2 if directory else 0)
        torch.manual_seed(caller_seed)  # the caller's state: the run must not depend on it
        before = torch.get_rng_state()
        train_loop([{"params": list(layer.parameters()), "lr": 0.05}], loss, len(batches),
                   steps=7, seed=4, name="drop", options=options)  # fmt: skip
        assert torch.equal(torch.get_rng_state(), before)  # and must leave it as it was
        return torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])

    caller_seed = 123
    uninterrupted = run(None, None)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path), crash_at=5)  # dies in step 5; the checkpoint is after step 4
    caller_seed = 999
    assert torch.equal(run(str(tmp_path), None), uninterrupted)
