"""One search worker of the PostgreSQL tests: a tiny MLP, a cheap search, a shared study.

    python -m tests.search.pg_worker URL STUDY --trials N --worker K --log FILE [--hang-at M]

Besides the study's own record, it appends ``<trial number> <pid>`` to ``--log`` as each trial
starts (an account of who ran what that does not come from Optuna). ``--hang-at M``: the M-th
trial (from 1) writes ``<log>.hang`` once its recipe is sampled and compression has begun, then
sleeps — so the test can kill the worker mid-trial. Heartbeat 1 s, grace 2 s, so a dead
worker's trial is found stale in seconds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

import slimline.api
from slimline.search import runner, search, study
from tests.conftest import TinyMLP

SPACE = {"methods": {"rtn": {"group_size": [32]}, "magnitude": {}}}
OBJECTIVES = ["size", "cosine"]  # cheap: no timing loop


def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 32, generator=g) for _ in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("study")
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--hang-at", type=int)
    args = parser.parse_args()
    study.HEARTBEAT_S, study.GRACE_S = 1, 2
    torch.set_num_threads(1)  # two workers on a small shared machine: no oversubscription
    torch.manual_seed(0)
    model = TinyMLP().eval()
    started: list[int] = []
    real_call, real_compress = runner._Trial.__call__, slimline.api.compress

    def logged(self: runner._Trial, trial: Any) -> tuple[float, ...]:
        started.append(trial.number)
        with args.log.open("a") as log:
            log.write(f"{trial.number} {os.getpid()}\n")
        return real_call(self, trial)

    def compress(*a: Any, **k: Any) -> Any:
        if args.hang_at is not None and len(started) == args.hang_at:
            args.log.with_suffix(".hang").write_text(str(started[-1]))
            time.sleep(3600)
        return real_compress(*a, **k)

    runner._Trial.__call__ = logged  # type: ignore[method-assign]
    slimline.api.compress = compress
    search(model, data(), space=SPACE, objectives=OBJECTIVES, constraints=["cosine>=0.5"],
           trials=args.trials, storage=args.url, study=args.study, worker=args.worker, runs=1,
           warmup=0, threads=1)


if __name__ == "__main__":
    main()
