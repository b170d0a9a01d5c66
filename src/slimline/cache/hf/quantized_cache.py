"""A Hugging Face ``Cache`` whose layers keep keys and values as integer codes + scales.

Attention still gets float tensors: every ``update`` returns the cached past dequantized,
followed by the new states exactly as computed, so the memory saving is in what stays
stored between steps (KIVI, arXiv 2402.02750, Algorithm 1):

* the ``residual_length`` most recent tokens stay in full precision; older tokens leave this
  window into the quantized store;
* ``key_axis="token"``: keys and values are quantized per token and head (one scale over the
  ``D`` channels), one token at a time as it leaves the window, so exactly the last
  ``residual_length`` tokens are in float;
* ``key_axis="channel"``: keys are quantized per channel over a group of ``residual_length``
  tokens, once the key window is full (KIVI's keys); values stay per token.

No quantization backend is needed (transformers' own ``QuantizedCache`` needs quanto or hqq for
integer codes): the maths is :mod:`slimline.cache.kv_quant`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from slimline.cache.kv_quant import QuantizedKV, check_kv_bits, dequantize_kv, quantize_kv

KeyAxis = Literal["token", "channel"]
_SEQ = 2  # the token axis of (B, H, T, D) states and of every stored tensor below


@dataclass(frozen=True)
class KVQuantSpec:
    """How one cache layer stores its states (the runtime half of ``KvCacheConfig``)."""

    bits: int = 8
    key_axis: KeyAxis = "token"
    residual_length: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        check_kv_bits(self.bits)
        if self.residual_length < 0:
            raise ValueError(f"residual_length must be >= 0, got {self.residual_length}")
        if self.key_axis == "channel" and self.residual_length < 1:
            raise ValueError("key_axis='channel' groups residual_length tokens: it must be >= 1")


class _Store:
    """Quantized states of one kind (keys or values), appended along the token axis.

    Per-token codes are (B, H, T, D'), scales (B, H, T, 1); per-channel groups of ``group``
    tokens are (B, H, n, group, D') with scales (B, H, n, 1, D): both grow along axis 2.
    """

    def __init__(self, bits: int, group: int | None) -> None:
        self.bits, self.group = bits, group
        self.q: QuantizedKV | None = None

    @property
    def tokens(self) -> int:
        if self.q is None:
            return 0
        return self.q.codes.shape[_SEQ] * (self.group or 1)

    def append(self, states: torch.Tensor, symmetric: bool) -> None:
        """Quantize ``states`` (B, H, t, D); ``t`` is a multiple of ``group`` when grouped."""
        if self.group:
            b, h, t, d = states.shape
            grouped = states.reshape(b, h, t // self.group, self.group, d)
            q = quantize_kv(grouped, self.bits, -2, symmetric=symmetric)
        else:
            q = quantize_kv(states, self.bits, -1, symmetric=symmetric)
        self.q = q if self.q is None else _cat(self.q, q)

    def dequantize(self, like: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) in ``like``'s dtype; empty along T when nothing is stored."""
        b, h, _, d = like.shape
        out = like.new_empty(b, h, self.tokens, d)
        self.dequantize_into(out)
        return out

    def dequantize_into(self, out: torch.Tensor) -> None:
        """Write the stored tokens, dequantized, into ``out`` (B, H, T, D), a view or not."""
        if self.q is None:
            return
        if self.group:
            b, h, t, d = out.shape
            out = out.view(b, h, t // self.group, self.group, d)
        dequantize_kv(self.q, self.bits, out=out)

    def truncate(self, keep: int, like: torch.Tensor) -> torch.Tensor:
        """Keep the first ``keep`` tokens; return those of a split group, dequantized."""
        whole = keep // (self.group or 1)
        if self.q is None or whole * (self.group or 1) == keep:
            self.map(lambda t: t[:, :, :whole])
            return like[:, :, :0]
        split = self.dequantize(like)[:, :, whole * (self.group or 1) : keep]
        self.map(lambda t: t[:, :, :whole])
        return split

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every stored tensor (batch reordering, slicing)."""
        if self.q is not None:
            codes, scale, offset = self.q
            self.q = QuantizedKV(fn(codes), fn(scale), None if offset is None else fn(offset))


def _cat(a: QuantizedKV, b: QuantizedKV) -> QuantizedKV:
    offset = None if a.offset is None or b.offset is None else torch.cat([a.offset, b.offset], _SEQ)
    return QuantizedKV(
        torch.cat([a.codes, b.codes], _SEQ), torch.cat([a.scale, b.scale], _SEQ), offset
    )


def _assemble(store: _Store, window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Stored past (dequantized), window and new states along T, written once into one tensor."""
    if store.q is None:
        return torch.cat([window, new], dim=_SEQ) if window.shape[_SEQ] else new
    b, h, t, d = new.shape
    past, r = store.tokens, window.shape[_SEQ]
    out = new.new_empty(b, h, past + r + t, d)
    store.dequantize_into(out[:, :, :past])
    if r:
        out[:, :, past : past + r] = window
    out[:, :, past + r :] = new
    return out


def _append(window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return torch.cat([window, new.detach()], dim=_SEQ) if window.shape[_SEQ] else new.detach()


def _flush(store: _Store, window: torch.Tensor, n: int, symmetric: bool) -> torch.Tensor:
    """Quantize the first ``n`` tokens of ``window`` into ``store``; return the rest."""
    if n <= 0:
        return window
    store.append(window[:, :, :n], symmetric)
    return window[:, :, n:] if n == window.shape[_SEQ] else window[:, :, n:].contiguous()


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: a quantized past and a full-precision recent window.

    ``self.keys`` / ``self.values`` (the names ``DynamicLayer`` uses) hold the window only;
    :meth:`full_states` gives everything, dequantized.
    """

    is_compileable = False
    # A rollback (``crop``) of tokens that were already quantized cannot restore them exactly.
    is_croppable = False

    def __init__(self, spec: KVQuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.cumulative_length = 0
        self._keys, self._values = self._new_stores()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty (B, H, 0, D) windows (``DynamicLayer`` starts from 1-D empty tensors)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(*key_states.shape[:_SEQ], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:_SEQ], 0, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H, t, D) states; return all keys and values for attention.

        The past comes back dequantized, the new states exactly as given: the prefill
        attends in full precision, and each token reads its own key and value unrounded.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        window_k, window_v = self._window()
        keys = _assemble(self._keys, window_k, key_states)
        values = _assemble(self._values, window_v, value_states)
        self.keys = self._flush_keys(_append(window_k, key_states))
        self.values = self._flush_values(_append(window_v, value_states))
        self.cumulative_length += key_states.shape[_SEQ]
        return keys, values

    def _window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-precision window (B, H, r, D) of keys and values."""
        if self.keys is None or self.values is None:
            raise ValueError("the cache layer holds nothing yet")
        return self.keys, self.values

    def _flush_keys(self, window: torch.Tensor) -> torch.Tensor:
        """Quantize the keys that left the full-precision window; return the new window."""
        r = self.spec.residual_length
        if self.spec.key_axis == "channel":  # whole groups of r tokens (KIVI's keys)
            return _flush(self._keys, window, window.shape[_SEQ] // r * r, self.spec.symmetric)
        return _flush(self._keys, window, window.shape[_SEQ] - r, self.spec.symmetric)

    def _flush_values(self, window: torch.Tensor) -> torch.Tensor:
        n = window.shape[_SEQ] - self.spec.residual_length
        return _flush(self._values, window, n, self.spec.symmetric)

    def full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys and values (B, H, T, D), the quantized part dequantized."""
        window_k, window_v = self._window()
        keys = torch.cat([self._keys.dequantize(window_k), window_k], dim=_SEQ)
        return keys, torch.cat([self._values.dequantize(window_v), window_v], dim=_SEQ)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def stored(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer keeps between steps, by name (codes, scales, window)."""
        if not self.is_initialized:
            return {}
        out = dict(zip(("keys_window", "values_window"), self._window(), strict=True))
        for kind, store in (("keys", self._keys), ("values", self._values)):
            parts = store.q._asdict() if store.q is not None else {}
            out |= {f"{kind}_{name}": t for name, t in parts.items() if t is not None}
        return out

    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets, plus the full-precision window."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())

    def reset(self) -> None:
        super().reset()  # drops the window, zeroes cumulative_length
        self._keys, self._values = self._new_stores()

    def _new_stores(self) -> tuple[_Store, _Store]:
        group = self.spec.residual_length if self.spec.key_axis == "channel" else None
        return _Store(self.spec.bits, group), _Store(self.spec.bits, None)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            window_k, window_v = self._window()
            self.keys, self.values = fn(window_k), fn(window_v)
            self._keys.map(fn)
            self._values.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: codes and scales are reordered as they are, with no requantization."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (``DynamicLayer``'s convention).

        Quantized tokens are sliced off as codes; only the kept tokens of a split key group
        (``key_axis="channel"``) go back to the window, dequantized, to be regrouped later.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.cumulative_length + tokens_to_remove, 0)
        window_k, window_v = self._window()
        self.keys = self._crop(self._keys, window_k, keep)
        self.values = self._crop(self._values, window_v, keep)
        self.cumulative_length = keep

    @staticmethod
    def _crop(store: _Store, window: torch.Tensor, keep: int) -> torch.Tensor:
        if keep >= store.tokens:
            return window[:, :, : keep - store.tokens]
        return store.truncate(keep, window)


class QuantizedKVCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are :class:`QuantizedKVLayer`.

    The layer structure comes from the model ``config`` the way ``DynamicCache`` builds it;
    layers of another kind (sliding window, linear attention) keep their own class.
    """

    def __init__(self, config: PreTrainedConfig, spec: KVQuantSpec) -> None:
        super().__init__(config=config)
        self.spec = spec
        self.layers = [
            QuantizedKVLayer(spec) if type(layer) is DynamicLayer else layer
            for layer in self.layers
        ]

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, None]]:
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer) and layer.is_initialized:
                yield (*layer.full_states(), None)
            else:
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
                yield keys, values, getattr(layer, "_sliding_window_tensor", None)

    @property
    def quantized_layers(self) -> int:
        return sum(isinstance(layer, QuantizedKVLayer) for layer in self.layers)


def cache_nbytes(cache: Any) -> int:
    """Bytes of key/value state a cache holds, from its stored tensors (any ``Cache``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, QuantizedKVLayer):
            total += layer.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
