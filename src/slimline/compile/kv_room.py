"""Room behind a transformers ``DynamicLayer``'s keys and values, so that a decode step appends
its new positions in place instead of concatenating the whole cache (``fast_decode``'s steps
and its C block step, :mod:`slimline.compile.decode_block`)."""

from __future__ import annotations

from typing import Any

import torch


def append_in_place(layer: Any, key: torch.Tensor, value: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Append the new positions' ``key`` / ``value`` (1, KV, m, D) to a transformers
    ``DynamicLayer`` and return its keys and values, as its ``update`` does, without
    concatenating the whole cache: the layer keeps room behind its cached positions (grown by
    doubling), a step writes the new positions there, and ``keys`` / ``values`` become views of
    the cached length. At 256 new tokens ``update`` copies every block's keys and values each
    step (~17 MB a token on ``llama-1b-random``); this copies the new positions.

    Memory that a tensor the layer handed out before covers is never written: a step writes
    past the current views, and when ``keys`` is no longer the view the layer last made (the
    model's own forward concatenated, the cache was cropped or copied) the room is made anew
    from the current tensors."""
    count = key.shape[-2]
    room = reserve(layer, count)
    length = layer.keys.shape[-2]
    room[0][..., length:length + count, :] = key
    room[1][..., length:length + count, :] = value
    return advance(layer, room, count)


def reserve(layer: Any, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The room behind ``layer``'s cached keys and values (:func:`append_in_place`): two
    tensors (1, KV, room, D) holding the cached positions first, with space for ``count``
    more."""
    keys, values = layer.keys, layer.values
    length = keys.shape[-2]
    room = getattr(layer, "_slimline_room", None)
    if (room is None or length + count > room[0].shape[-2]
            or keys.data_ptr() != room[0].data_ptr()
            or values.data_ptr() != room[1].data_ptr() or keys.shape != room[2]):
        size = list(keys.shape)
        size[-2] = max(2 * length, length + max(64, count))
        room_keys, room_values = keys.new_empty(size), values.new_empty(size)
        room_keys[..., :length, :] = keys
        room_values[..., :length, :] = values
        room = (room_keys, room_values, keys.shape)
        layer._slimline_room = room
    return room[0], room[1]


def advance(layer: Any, room: tuple[torch.Tensor, torch.Tensor], count: int = 1) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Make ``layer``'s keys and values the views of its room ``count`` positions longer (the
    new positions written there by :func:`append_in_place` or the C block step)."""
    length = layer.keys.shape[-2] + count
    layer.keys, layer.values = room[0][..., :length, :], room[1][..., :length, :]
    layer._slimline_room = (room[0], room[1], layer.keys.shape)
    return layer.keys, layer.values


def filled(layer: Any) -> bool:
    """Whether a dynamic cache layer holds positions (a prefill ran through it)."""
    return bool(layer.is_initialized and layer.keys.numel() > 0)
