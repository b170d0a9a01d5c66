"""Two processes on gloo (the path ``torchrun --nproc-per-node 2`` takes) against one process
with the same global batch: the same loss curve, the same trained weights."""

from __future__ import annotations

import json

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from slimline.train.loop import train_loop
from slimline.train.options import LoopOptions

STEPS = 20


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 3, generator=g)
    out = []
    for _ in range(6):
        x = torch.randn(4, 8, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


def _train(accumulation: int, seed_model: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(seed_model)  # ranks start apart: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    batches = _batches()

    def loss(i: int) -> torch.Tensor:
        x, y = batches[i]
        return (model(x) - y).pow(2).mean()

    losses = train_loop([{"params": list(model.parameters()), "lr": 1e-2}], loss, len(batches),
                        steps=STEPS, seed=0, name="ddp",
                        options=LoopOptions(accumulation=accumulation, warmup=2))  # fmt: skip
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _early_stopping(rank: int, checkpoint_dir: str) -> list[float]:
    """A run whose held-out loss differs by rank: rank 0 alone would find its best at the
    third evaluation and stop at step 10, the mean (5, 3, 5, 5.5, 6.5, ...) stops at 8."""
    p = nn.Parameter(torch.zeros(1))
    held = {0: [5.0, 3.0, 1.0, 2.0, 4.0, 6.0, 7.0], 1: [5.0, 3.0, 9.0, 9.0, 9.0, 9.0, 9.0]}
    values = iter(held[rank])
    options = LoopOptions(optimizer="sgd", eval_every=2, patience=3,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=2)  # fmt: skip
    return train_loop([{"params": [p], "lr": 0.1}], lambda _: -p.sum(), 1, steps=20, seed=0,
                      name="stop", options=options, evaluate=lambda: next(values))  # fmt: skip


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        losses, state = _train(accumulation=1, seed_model=rank)
        save_file(state, f"{out_dir}/rank{rank}.safetensors")
        stopped = _early_stopping(rank, f"{out_dir}/ckpt")
        resumed = _early_stopping(rank, f"{out_dir}/ckpt")  # every rank resumes the end
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"losses": losses, "stopped": stopped, "resumed": resumed}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path) -> None:
    # One process accumulating 2 micro-batches per step sees, at each step, the batches the
    # two ranks see together (loop.py: micro-batch j of step t on rank r is order[(tA+j)W+r]).
    one_losses, one_state = _train(accumulation=2, seed_model=0)
    # fork: the ranks start in milliseconds and inherit the imports.
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    curves = [run["losses"] for run in runs]
    # Early stopping on the held-out loss averaged over the ranks: both stop at step 8.
    assert len(runs[0]["stopped"]) == len(runs[1]["stopped"]) == 8
    assert runs[0]["resumed"] == runs[0]["stopped"] == runs[1]["resumed"]
    states = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert curves[0] == curves[1]  # the reported loss is the global batch's, on every rank
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # ranks identical
    assert len(curves[0]) == STEPS and curves[0][-1] < 0.5 * curves[0][0]
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(one_losses),
                               rtol=0, atol=1e-4)  # fmt: skip
    for k, v in one_state.items():
        torch.testing.assert_close(states[0][k], v, rtol=0, atol=1e-4)
