"""Peer libraries' weight-only quantizers, applied to the same layers slimline targets.

Each builder copies the model and quantizes the named Linear layers (slimline's default
targets: every Linear-like layer but the output head), so that quality, bytes and latency
compare like with like. The peers are optional imports (the ``peers`` extra): a missing
library or a failing call is raised to the caller, which reports it in the table.

Bytes of a peer's layers are the bytes of their tensors as stored, scales and zero points
included: torchao's and optimum-quanto's weights are tensor subclasses, counted through
their inner tensors (``__tensor_flatten__``, recursively) by
``slimline.evaluate.footprint.size_in_memory``.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from slimline.core.memory import release_free_memory

PeerBuilder = Callable[[nn.Module, Sequence[str]], tuple[nn.Module, str]]


@dataclass(frozen=True)
class Peer:
    """A peer row: its label and how to build it (returns the model and a note)."""

    label: str
    build: PeerBuilder


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def peer_versions() -> str:
    return f"torchao {_version('torchao')}, optimum-quanto {_version('optimum-quanto')}"


def _torchao(config_factory: Callable[[], object]) -> PeerBuilder:
    def build(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, str]:
        from torchao.quantization import quantize_

        wanted = set(names)
        peer = copy.deepcopy(model)
        quantize_(peer, config_factory(), filter_fn=lambda m, fqn: fqn in wanted)  # type: ignore[arg-type]
        kinds = {type(peer.get_submodule(n).weight).__name__ for n in names}
        skipped = [n for n in names if type(peer.get_submodule(n).weight).__name__ in ("Tensor", "Parameter")]
        note = f"weights: {', '.join(sorted(kinds))}"
        if skipped:
            note += f"; {len(skipped)} of {len(names)} layers left in fp32 by torchao"
        return peer, note

    return build


def _torchao_int8() -> object:
    from torchao.quantization import Int8WeightOnlyConfig

    # version 2 default: symmetric per-row (per output channel) int8; no inductor changes,
    # every row here runs eagerly.
    return Int8WeightOnlyConfig(set_inductor_config=False)


def _torchao_int4() -> object:
    from torchao.quantization import Int4WeightOnlyConfig

    # The stable config's default packing (plain Int4Tensor) needs the mslk CUDA kernels.
    return Int4WeightOnlyConfig(group_size=128, set_inductor_config=False)


def _torchao_int4_cpu() -> object:
    # torchao 0.18's CPU int4 weight-only path: Int4OpaqueTensor, packed for the CPU
    # tinygemm kernel (aten._weight_int4pack_mm_for_cpu), asymmetric per-group.
    from torchao.prototype.quantization.int4.inference_workflow import (
        PrototypeInt4WeightOnlyConfig,
    )

    return PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False)


def _quanto(bits: int) -> PeerBuilder:
    def build(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, str]:
        from optimum.quanto import freeze, qint4, qint8, quantize

        peer = copy.deepcopy(model)
        quantize(peer, weights=qint8 if bits == 8 else qint4, include=list(names))
        freeze(peer)
        groups = {getattr(peer.get_submodule(n), "weight_group_size", "?") for n in names}
        shown = sorted("per-channel" if g is None else str(g) for g in groups)
        return peer, f"group size: {', '.join(shown)}"

    return build


PEERS: list[Peer] = [
    Peer("torchao int8-wo (Int8WeightOnlyConfig)", _torchao(_torchao_int8)),
    Peer("torchao int4-wo g128 (Int4WeightOnlyConfig)", _torchao(_torchao_int4)),
    Peer("torchao int4-wo g128 (PrototypeInt4WeightOnlyConfig, CPU)", _torchao(_torchao_int4_cpu)),
    Peer("quanto int8 (qint8)", _quanto(8)),
    Peer("quanto int4 (qint4)", _quanto(4)),
]


def failure_note(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"failed: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so that a peak-RSS reading taken
    next starts from the memory actually in use."""
    gc.collect()
    release_free_memory()
