"""The memory-bandwidth bound of batch-1 decode: bytes read per token against bytes per second.

A decode step of a large language model at batch 1 reads every weight once and does about
two flops with each, far below what a CPU computes in the time the bytes take to arrive; its
speed limit is therefore ``bandwidth / bytes read per token`` (the roofline model, Williams
et al., CACM 2009, doi:10.1145/1498765.1498785). MEASURING.md asks every decode row to print
its fraction of that limit.

* :func:`streaming_read_bandwidth` measures the machine: the time to sum a tensor far larger
  than the caches, with the threads torch uses;
* :func:`decode_bytes_per_token` counts what one decode step of a model reads: every
  parameter and persistent buffer as stored (packed codes, scales, zero points, biases,
  norms, the head), but one row of each embedding table;
* :func:`bandwidth_bound` divides one by the other.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

DEFAULT_BYTES = 512 * 2**20  # well past any L3 cache, so the sum streams from DRAM
_FLOAT32 = 4


@dataclass(frozen=True)
class Bandwidth:
    """Timed streaming reads of ``n_bytes``: seconds per read, and bytes per second."""

    n_bytes: int
    seconds: tuple[float, ...]

    @property
    def median_bytes_per_s(self) -> float:
        """``n_bytes`` over the median read time: the figure to divide by."""
        return self.n_bytes / statistics.median(self.seconds)

    @property
    def best_bytes_per_s(self) -> float:
        """``n_bytes`` over the fastest read: what the machine reached at least once."""
        return self.n_bytes / min(self.seconds)


def streaming_read_bandwidth(
    n_bytes: int = DEFAULT_BYTES,
    *,
    runs: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> Bandwidth:
    """Time ``runs`` sums of an ``n_bytes`` float32 tensor (after ``warmup`` untimed ones).

    The tensor is written once first, so its pages are resident and the timed reads measure
    memory, not page faults. ``torch.sum`` is vectorised and uses ``torch.get_num_threads()``
    threads: set the thread count of the measurement it is compared with. On a GPU
    (``device``) the tensor lives in its memory and each read is timed between device
    synchronisations; make it several times the GPU's last-level cache.
    """
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < _FLOAT32:
        raise ValueError(f"n_bytes must be an int of at least {_FLOAT32}, got {n_bytes!r}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    data = torch.ones(n_bytes // _FLOAT32, device=device)
    def sync() -> None:
        if data.device.type == "cuda":
            torch.cuda.synchronize(data.device)

    seconds: list[float] = []
    for index in range(warmup + runs):
        sync()
        start = time.perf_counter()
        data.sum()
        sync()
        elapsed = time.perf_counter() - start
        if index >= warmup:
            seconds.append(elapsed)
    return Bandwidth(data.numel() * _FLOAT32, tuple(seconds))


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads from memory.

    Every parameter and persistent buffer counts with its stored bytes, once (shared tensors,
    e.g. a head tied to the embedding, are read once, in full); an ``nn.Embedding`` that is
    not also used elsewhere counts one row, the token it looks up. Derived kernel layouts are
    not counted: a layer that keeps one reads that instead of, not besides, its buffers.
    """
    stored = {id(t) for t in model.state_dict(keep_vars=True).values()}  # persistent only
    embedding_rows: dict[int, int] = {}
    full: dict[int, int] = {}
    for module in model.modules():
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in own:
            if id(tensor) not in stored:
                continue
            if isinstance(module, nn.Embedding) and name == "weight":
                embedding_rows[id(tensor)] = tensor.shape[1] * tensor.element_size()
            else:
                full[id(tensor)] = tensor.numel() * tensor.element_size()
    rows = sum(size for key, size in embedding_rows.items() if key not in full)
    return sum(full.values()) + rows


def bandwidth_bound(bytes_per_token: int, bytes_per_s: float) -> float:
    """The tokens per second no batch-1 decode can beat on this memory: bandwidth / bytes."""
    if bytes_per_token <= 0 or bytes_per_s <= 0:
        raise ValueError(
            f"bytes_per_token and bytes_per_s must be positive, got {bytes_per_token}, "
            f"{bytes_per_s}"
        )
    return bytes_per_s / bytes_per_token
