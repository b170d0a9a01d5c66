"""Resumable training checkpoints: one safetensors file, its JSON state in the header.

The file holds the trained tensors (the float32 masters where there are some), the
optimizer's per-parameter state and the best evaluated parameters; no random state (the loop
reseeds each step from its seed, rank and step number). Its ``__metadata__`` holds the
loop's JSON state (step, losses, early-stopping counters, learning rates) and the identity
of the run (name, steps, seed, data, shapes), checked on resume so that a directory is never
resumed into another run. Written to a temporary name and renamed, so that a run killed
mid-write leaves the previous checkpoint whole. No pickle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "train_state.safetensors"


def _same(value: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    return value


@dataclass
class LoopState:
    """Where a run stands: what the loop needs to continue exactly where it was."""

    step: int = 0  # optimizer steps done
    losses: list[float] = field(default_factory=list)
    best: float = math.inf  # best held-out loss so far
    bad: int = 0  # evaluations since the best one
    best_params: list[torch.Tensor] | None = None
    stopped: bool = False  # early stopping fired


def save_state(
    directory: str | Path,
    run: dict[str, Any],
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    *,
    whole: Callable[[torch.Tensor], torch.Tensor] = _same,
    write: bool = True,
) -> Path:
    """Write the checkpoint of ``state`` atomically into ``directory``; returns its path.

    ``whole(t)`` is the whole value of a sharded tensor (a collective under FSDP: every rank
    calls this, and only the one with ``write`` writes)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = whole(p.detach()).contiguous().cpu()
    for i, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{i}.{key}"] = whole(value.detach()).contiguous().cpu()
            else:
                scalars.setdefault(str(i), {})[key] = value
    for i, p in enumerate(state.best_params or []):
        tensors[f"best.{i}"] = whole(p).contiguous().cpu()
    path = Path(directory)
    if not write:
        return path / STATE_FILE
    meta = {
        "run": run,
        "step": state.step,
        "losses": state.losses,
        "best": None if math.isinf(state.best) else state.best,
        "bad": state.bad,
        "stopped": state.stopped,
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "optimizer_scalars": scalars,
    }
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{STATE_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, path / STATE_FILE)
    return path / STATE_FILE


def load_state(
    directory: str | Path,
    run: dict[str, Any],
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _same,
) -> LoopState | None:
    """Restore ``params`` and ``optimizer`` from ``directory``'s checkpoint; the loop state,
    or None when there is none. ValueError when it belongs to another run. ``place(value,
    p)`` lays a whole saved value out as parameter ``p`` is (its shard under FSDP)."""
    file = Path(directory) / STATE_FILE
    if not file.is_file():
        return None
    meta = _metadata(file)
    if meta.get("run") != run:
        raise ValueError(
            f"checkpoint_dir: {directory} holds the checkpoint of another run "
            f"({meta.get('run')}); this run is {run}. Use another directory or remove it."
        )
    tensors = load_file(str(file))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(place(tensors[f"param.{i}"], p))
    _load_optimizer(optimizer, tensors, meta, place)
    best = None
    if "best.0" in tensors:
        best = [place(tensors[f"best.{i}"].to(p.device), p) for i, p in enumerate(params)]
    return LoopState(
        step=int(meta["step"]),
        losses=[float(x) for x in meta["losses"]],
        best=math.inf if meta["best"] is None else float(meta["best"]),
        bad=int(meta["bad"]),
        best_params=best,
        stopped=bool(meta["stopped"]),
    )


def _metadata(file: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    if "state" not in header:
        raise ValueError(f"checkpoint_dir: {file} is not a training checkpoint")
    meta: dict[str, Any] = json.loads(header["state"])
    return meta


def _load_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    current = optimizer.state_dict()
    for group, lr in zip(current["param_groups"], meta["lrs"], strict=True):
        group["lr"] = lr
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    for group in optimizer.param_groups:  # per-element states (moments) laid out as their params
        for p in group["params"]:
            per_param = optimizer.state.get(p, {})
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape == p.shape:
                    per_param[key] = place(value, p)
