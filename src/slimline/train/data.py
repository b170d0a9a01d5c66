"""Training batches: re-cut to a batch size, a held-out slice, token counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from slimline.core.batches import Batch, batch_size, token_mask


def rebatch(batches: Sequence[Batch], size: int, *, field: str = "batch_size") -> list[Batch]:
    """The samples of ``batches`` in order, cut into batches of ``size`` rows (the last may
    be smaller). ValueError naming ``field`` when the batches cannot be joined (other keys
    or other shapes beyond the first dimension, e.g. different sequence lengths)."""
    if not batches:
        return []
    first = batches[0]
    try:
        if isinstance(first, torch.Tensor):
            joined: Batch = torch.cat(list(batches))  # type: ignore[arg-type]
        elif isinstance(first, Mapping):
            keys = list(first)
            joined = {k: torch.cat([b[k] for b in batches]) for k in keys}  # type: ignore[index,call-overload]
        else:
            joined = tuple(torch.cat(ts) for ts in zip(*batches, strict=True))
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{field}: the training batches cannot be joined to re-cut them ({exc}); "
            "give batches of one shape or batch_size null"
        ) from None
    n = batch_size(joined)
    return [_rows(joined, start, min(start + size, n)) for start in range(0, n, size)]


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return tuple(t[start:stop] for t in batch)


def hold_out(batches: list[Batch], fraction: float) -> tuple[list[Batch], list[Batch]]:
    """(train, held-out): the last share ``fraction`` of the batches (rounded) held out,
    at least one when ``fraction`` > 0, always at least one left to train on."""
    if fraction <= 0.0 or len(batches) < 2:
        return batches, []
    n_held = min(max(1, round(len(batches) * fraction)), len(batches) - 1)
    return batches[:-n_held], batches[-n_held:]


def count_tokens(batch: Batch) -> int:
    """Real tokens of a batch (its attention mask), else its items."""
    mask = token_mask(batch)
    return int(mask.sum()) if mask is not None else batch_size(batch)
