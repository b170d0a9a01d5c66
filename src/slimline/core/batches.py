"""Batches and forward passes: one place that knows how a batch is fed to a model.

A batch is what ARCHITECTURE.md calls it: a dict of tensors (Hugging Face style, passed as
keyword arguments), a tensor, or a tuple/list of tensors (passed positionally). Calibration,
evaluation and the handlers all go through :func:`forward` so that they agree.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

Batch: TypeAlias = Mapping[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor]


def check_batch(batch: object, *, where: str = "batch") -> Batch:
    """Raise a TypeError naming ``where`` unless ``batch`` has one of the accepted forms."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                kind = type(value).__name__
                raise TypeError(f"{where}: value of {key!r} is {kind}, not a tensor")
        return batch
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return batch
    raise TypeError(
        f"{where}: expected a dict of tensors, a tensor or a tuple of tensors, "
        f"got {type(batch).__name__}"
    )


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(t.to(device) for t in batch)


def batch_size(batch: Batch) -> int:
    """Number of items in a batch (the leading dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(first.shape[0])


LABEL_KEY = "labels"


def split_labels(batch: Batch) -> tuple[Batch, torch.Tensor | None]:
    """Separate the targets (a dict batch's ``"labels"``) from the model inputs."""
    if isinstance(batch, Mapping) and LABEL_KEY in batch:
        inputs = {k: v for k, v in batch.items() if k != LABEL_KEY}
        return inputs, batch[LABEL_KEY]
    return batch, None


def forward(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on ``batch``: keyword arguments for dicts, positional otherwise.

    A dict batch's ``"labels"`` are targets for metrics, never passed to the model. A
    left-padded batch gets ``position_ids`` counted over its real tokens (as ``generate``
    does), so that each sequence is computed as it would be alone, unpadded.
    """
    batch, _ = split_labels(batch)
    if isinstance(batch, Mapping):
        return model(**with_positions(model, batch))
    if isinstance(batch, torch.Tensor):
        return model(batch)
    return model(*batch)


def token_mask(batch: Batch) -> torch.Tensor | None:
    """(B, T) bool: the real (non-padding) tokens of a dict batch; None when it has no mask.

    Only a 2-D ``attention_mask`` of ``input_ids``' shape counts: other masks (4-D, custom)
    do not say which tokens are padding.
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if isinstance(ids, torch.Tensor) and ids.shape != mask.shape:
        return None
    return mask.bool()


def is_left_padded(mask: torch.Tensor) -> bool:
    """Whether some row of a (B, T) mask has padding before a real token."""
    return bool((mask[:, 1:] > mask[:, :-1]).any())


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token among its row's real tokens; padding gets 0."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0) * mask.long()


def with_positions(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``batch`` plus ``position_ids`` from its mask when it is left-padded and ``model``
    takes them and none were given; otherwise ``batch`` unchanged (as a dict)."""
    out = dict(batch)
    mask = token_mask(batch)
    if mask is None or "position_ids" in out or not is_left_padded(mask):
        return out
    if _takes(type(model), "position_ids"):
        out["position_ids"] = positions_from_mask(mask)
    return out


def _takes(cls: type[nn.Module], name: str) -> bool:
    if cls not in _PARAMS:
        try:
            _PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
        except (TypeError, ValueError):
            _PARAMS[cls] = frozenset()
    return name in _PARAMS[cls]


_PARAMS: dict[type[nn.Module], frozenset[str]] = {}


def output_tensor(output: Any, batch: Batch) -> torch.Tensor:
    """The tensor that stands for a model's answer, for quality comparisons.

    ``logits`` for classifiers and language models; for encoders (``last_hidden_state``),
    the attention-masked mean over tokens, which is how sentence encoders such as
    all-MiniLM-L6-v2 pool; a plain tensor output as it is.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return mean_pool(hidden, _attention_mask(batch))
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find an output tensor in a {type(output).__name__}")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, C) over the tokens where ``mask`` (B, T) is 1."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _attention_mask(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        return batch.get("attention_mask")
    return None


def materialize(batches: Iterable[object], *, where: str = "calibration") -> list[Batch]:
    """Turn an iterable of batches into a checked list (so it can be walked several times)."""
    out = [check_batch(b, where=f"{where}[{i}]") for i, b in enumerate(batches)]
    for i, b in enumerate(out):
        for t in _tensors(b):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{where}[{i}]: contains NaN or inf values")
    return out


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return list(batch.values())
    return list(batch)
