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


def group_by_length(
    batches: Sequence[Batch], size: int, *, field: str = "group_by_length"
) -> list[Batch]:
    """The samples of ``batches`` re-cut into batches of ``size`` rows of similar real length,
    each padded only to its own longest row (the ``group_by_length`` of Hugging Face's
    Trainer). Padding costs the compute of real tokens: the built-in minilm train split is
    60% padding at 32 sentences a batch. The batches come out shortest first; the training
    loop shuffles their order every epoch.

    Dict batches with an ``attention_mask`` (B, T) whose real tokens are contiguous in every
    row; tensors shaped (B, T, ...) are cut to those tokens, others are taken by row. New
    padding goes on the side the input was padded on, with the value found at padded
    positions of that key (else 0, or -100 for ``labels``). ValueError naming ``field`` for
    batches it cannot regroup.
    """
    rows: list[dict[str, torch.Tensor]] = []
    sequence_keys: set[str] = set()
    pads: dict[str, float] = {}
    left = False
    for batch in batches:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if not isinstance(batch, Mapping) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"{field}: needs dict batches with a (batch, tokens) attention_mask")
        real = mask != 0
        left = left or bool((~real[:, 0] & real.any(1)).any())
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.shape[:1] != mask.shape[:1]:
                raise ValueError(f"{field}: {key!r} is not a tensor with one row per sample")
            if value.shape[:2] == mask.shape:
                sequence_keys.add(key)
                if key not in pads and bool((~real).any()):
                    pads[key] = value[~real][0].flatten()[0].item()
        for i, (start, stop) in enumerate(_real_spans(real, field)):
            rows.append({k: v[i, start:stop] if k in sequence_keys else v[i]
                         for k, v in batch.items()})
    order = sorted(range(len(rows)), key=lambda i: int(rows[i]["attention_mask"].shape[0]))
    return [_stack([rows[i] for i in order[s : s + size]], sequence_keys, pads, left)
            for s in range(0, len(order), size)]


def _real_spans(real: torch.Tensor, field: str) -> list[tuple[int, int]]:
    """(start, stop) of each row's real tokens; ValueError when a row's are not contiguous."""
    spans = []
    for row in real:
        where = row.nonzero().flatten()
        start, stop = (int(where[0]), int(where[-1]) + 1) if where.numel() else (0, 0)
        if stop - start != where.numel():
            raise ValueError(f"{field}: a row's real tokens are not contiguous (packed sequences?)")
        spans.append((start, stop))
    return spans


def _stack(rows: list[dict[str, torch.Tensor]], sequence_keys: set[str], pads: dict[str, float],
           left: bool) -> Batch:
    """One batch of samples; sequence tensors padded to the longest row (``left`` or right)."""
    longest = max(int(r["attention_mask"].shape[0]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        if key not in sequence_keys:
            out[key] = torch.stack([r[key] for r in rows])
            continue
        fill = 0 if key == "attention_mask" else pads.get(key, -100 if key == "labels" else 0)
        first = rows[0][key]
        padded = first.new_full((len(rows), longest, *first.shape[1:]), fill)
        for i, r in enumerate(rows):
            n = int(r[key].shape[0])
            if left:
                padded[i, longest - n:] = r[key]
            else:
                padded[i, :n] = r[key]
        out[key] = padded
    return out
