"""Joining the processes ``torchrun`` started: the CLI's training steps on N processes.

``torchrun --nproc-per-node N $(which slimline) compress ...`` starts N copies of the command
with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. Each
copy loads the model and the data alike (every step before training is deterministic), the
training steps then run on the one process group (:mod:`slimline.train.loop`), and rank 0 alone
saves and prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched_size() -> int:
    """The number of processes ``torchrun`` started (1 without it)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE: must be an integer, got {value!r}") from exc


@contextmanager
def process_group() -> Iterator[int]:
    """This process's rank, inside the process group of the processes ``torchrun`` started
    (gloo for CPU tensors, NCCL for GPU ones when there is a GPU), left on exit; 0 and nothing
    to join without ``torchrun``. A group the caller already joined is used as it is."""
    if launched_size() == 1 or (dist.is_available() and dist.is_initialized()):
        yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return
    if not dist.is_available():
        raise ValueError("torchrun: this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()
