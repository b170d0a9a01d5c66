"""Calibration: capture layer inputs with forward hooks, and walk a model block by block.

Two tools for calibration-based methods (GPTQ, SparseGPT, Wanda, AWQ...):

* :func:`capture_inputs` runs batches through the model and hands every input of the chosen
  layers to an accumulator (``add_batch``-style, as in the GPTQ reference), so the method
  keeps statistics (a Hessian, a norm), not the activations.
* :func:`walk_blocks` finds the repeated blocks of a model (a transformer's layer list) and
  yields them one at a time with their recorded inputs; after the caller has changed a block,
  its outputs on those inputs become the next block's inputs. Activations of one block are
  alive at a time, so peak memory stays near one block plus the model (arXiv 2210.17323 §4).

Padding never enters a statistic: while a batch (or a block's recorded inputs) runs, its
attention mask says which tokens are real, and a layer input of shape (B, T, ...) reaches the
accumulator as its real tokens only, (tokens, ...). Padded batches of varied lengths then give
the statistics of the same sequences fed one at a time, unpadded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from slimline.core.batches import Batch, forward, token_mask
from slimline.core.memory import release_free_memory

InputSink = Callable[[str, torch.Tensor], None]


class RealTokens:
    """The (B, T) mask of real tokens of the batch running now (None: every token is real)."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        # A batch without padding keeps every token: no copy of each layer input is made.
        self._mask = None if mask is None or bool(mask.all()) else mask

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, ...) or flattened (B·T, ...) → (real tokens, ...); other shapes (a
        CNN's (B, C, H, W), a batch without a mask) pass unchanged. OPT flattens its tokens
        before the MLP, so both layouts occur inside one block."""
        mask = self._mask
        if mask is None:
            return x
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(x.device)]
        if x.dim() == 2 and x.shape[0] == mask.numel() and mask.shape[1] > 1:
            return x[mask.reshape(-1).to(x.device)]
        return x


@contextmanager
def hooked_inputs(
    modules: dict[str, nn.Module], sink: InputSink, tokens: RealTokens | None = None
) -> Iterator[None]:
    """While active, every forward of ``modules[name]`` calls ``sink(name, first_input)``,
    with only the real tokens of the first input when ``tokens`` knows the batch's mask.

    Layers that read one tensor (a transformer's q, k and v projections read the same hidden
    state) are handed one and the same object: the sink can tell that they share an input.
    """
    handles = []
    last: list[torch.Tensor] = []  # [the input last seen, what the sink got for it]
    for name, module in modules.items():

        def hook(_mod: nn.Module, args: tuple[Any, ...], *, _name: str = name) -> None:
            x = args[0]
            if not last or last[0] is not x:
                kept = tokens.keep(x.detach()) if tokens is not None else x.detach()
                last[:] = [x, kept]
            sink(_name, last[1])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        last.clear()
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_inputs(
    model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Batch], sink: InputSink
) -> None:
    """Run ``batches`` through ``model``, feeding each layer input (real tokens) to ``sink``."""
    tokens = RealTokens()
    with hooked_inputs(modules, sink, tokens):
        for batch in batches:
            tokens.mask = token_mask(batch)
            forward(model, batch)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the longest ``ModuleList`` whose items share one class.

    Works for Llama (``model.layers``), BERT (``encoder.layer``), GPT-2 (``transformer.h``)
    and OPT (``decoder.layers``) without naming any of them.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to walk")
    return best


class _StopForward(Exception):
    """Raised by the first block's hook once its inputs are recorded."""


@dataclass
class BlockInputs:
    """The positional and keyword arguments one batch passed to a block, and which of its
    tokens are real (the batch's attention mask, (B, T) bool; None: all)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None = None


def _record_first_block(
    model: nn.Module, first: nn.Module, batches: Sequence[Batch]
) -> list[BlockInputs]:
    recorded: list[BlockInputs] = []
    tokens = RealTokens()

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A KV cache recorded here would grow on every replay and feed stale keys/values
        # to the block once it has changed: replay without one. It is found by what it is,
        # not by its argument's name (transformers 5.24 renamed ``past_key_values`` to
        # ``cache``), wherever it was passed.
        kept = {k: None if _is_kv_cache(v) or k in _CACHE_KEYS else v for k, v in kwargs.items()}
        if "use_cache" in kept:
            kept["use_cache"] = False
        kept_args = tuple(None if _is_kv_cache(a) else a for a in args)
        recorded.append(BlockInputs(kept_args, kept, tokens.mask))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            tokens.mask = token_mask(batch)
            with suppress(_StopForward):
                forward(model, batch)
    finally:
        handle.remove()
    return recorded


_CACHE_KEYS = frozenset({"past_key_values", "past_key_value", "layer_past", "cache"})


def _is_kv_cache(value: object) -> bool:
    """A transformers ``Cache`` (or a legacy tuple-of-tensors cache object) by its interface."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def walk_blocks(
    model: nn.Module, batches: Sequence[Batch]
) -> Iterator[tuple[int, str, nn.Module, list[BlockInputs]]]:
    """Yield ``(index, name, block, inputs)`` for each block, in order.

    The caller may change the block (in place) before asking for the next one; the next
    block then sees the outputs of the changed block, as sequential GPTQ requires.
    """
    prefix, blocks = find_blocks(model)
    inputs = _record_first_block(model, blocks[0], batches)
    for index, block in enumerate(blocks):
        yield index, f"{prefix}.{index}", block, inputs
        for item in inputs:
            out = _hidden(block(*item.args, **item.kwargs))
            item.args = (out, *item.args[1:]) if item.args else ()
            if not item.args:
                key = "hidden_states" if "hidden_states" in item.kwargs else next(iter(item.kwargs))
                item.kwargs[key] = out


@torch.no_grad()
def replay(
    block: nn.Module, inputs: Sequence[BlockInputs], modules: dict[str, nn.Module],
    sink: InputSink,
) -> None:
    """Run ``block`` on its recorded inputs, feeding ``modules``' real-token inputs to ``sink``."""
    tokens = RealTokens()
    with hooked_inputs(modules, sink, tokens):
        for item in inputs:
            tokens.mask = item.mask
            block(*item.args, **item.kwargs)


class Accumulator(Protocol):
    """Statistics of a layer's inputs, fed one batch of activations at a time."""

    tokens: int

    def add_batch(self, x: torch.Tensor) -> None: ...


A = TypeVar("A", bound=Accumulator)


def sequential_layers(
    model: nn.Module,
    layers: Iterable[str],
    calibration: Sequence[Batch],
    make: Callable[[str, nn.Module], A],
    update: Callable[[dict[str, nn.Module], dict[str, A]], None],
    *,
    progress: bool = False,
    desc: str = "calibration",
    share_inputs: bool = False,
) -> None:
    """Feed the inputs of each named layer to its accumulator, then let ``update`` change
    the layers (``update(group, stats)``: the group's modules and accumulators by name).

    Layers inside the model's blocks are handled block by block (:func:`walk_blocks`): a
    block's layers see inputs produced by the already-updated earlier blocks, as in the
    sequential GPTQ / SparseGPT procedures, and only one block's activations are alive.
    Layers outside any block (or all, for models without blocks) get one whole-model pass.
    Modules are looked up by name when their block comes, and no reference to them is kept
    afterwards: a layer that ``update`` replaces is freed then (the caller should hold names,
    not modules), and after each block freed memory is handed back to the OS
    (:func:`release_free_memory`) — with in-place quantization the float model shrinks as the
    walk goes.

    ``share_inputs``: the accumulator ``make`` builds depends on the layer's inputs alone, so
    layers that read the same tensor get one accumulator, fed once (q/k/v and gate/up of a
    Llama block: one X Xᵀ instead of three and two). ``update`` may drop entries of the
    statistics it is given once it has used them, to free them early.
    """
    names = list(layers)
    done: set[str] = set()
    try:
        n_blocks = len(find_blocks(model)[1])
    except ValueError:
        n_blocks = 0
    if n_blocks:
        walk = tqdm(walk_blocks(model, calibration), total=n_blocks, desc=desc, unit="block",
                    disable=not progress, leave=False)
        for _, block_name, block, inputs in walk:
            group = {
                n: model.get_submodule(n) for n in names if n.startswith(block_name + ".")
            }
            feed = _Feed(group, make, share_inputs)
            replay(block, inputs, group, feed)
            _update(update, group, feed.finish())
            done |= set(group)
            del feed, group
            release_free_memory()
    rest = {n: model.get_submodule(n) for n in names if n not in done}
    if rest:
        feed = _Feed(rest, make, share_inputs)
        capture_inputs(model, rest, calibration, feed)
        _update(update, rest, feed.finish())


class _Feed(Generic[A]):
    """The sink of a calibration pass: each layer input goes to the layer's accumulator,
    made on first use. With ``share``, a layer whose first input is the very tensor another
    layer's fresh accumulator was just fed gets that accumulator, and it is fed once per
    tensor (:func:`hooked_inputs` hands layers reading one tensor the same object)."""

    def __init__(
        self, modules: dict[str, nn.Module], make: Callable[[str, nn.Module], A], share: bool
    ) -> None:
        self.modules, self.make, self.share = modules, make, share
        self.stats: dict[str, A] = {}
        self._x: torch.Tensor | None = None  # the tensor being handed out now
        self._fed: list[A] = []  # accumulators fed with it
        self._made: list[A] = []  # accumulators made for it (fed it alone so far)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if x is not self._x:
            self._x, self._fed, self._made = x, [], []
        acc = self.stats.get(name)
        if acc is None:
            if self.share and self._made:
                acc = self._made[0]
            else:
                acc = self.make(name, self.modules[name])
                self._made.append(acc)
            self.stats[name] = acc
        if any(acc is a for a in self._fed):
            return  # a shared accumulator already has this tensor
        acc.add_batch(x)
        self._fed.append(acc)

    def finish(self) -> dict[str, A]:
        """Every layer's accumulator, in the layers' order (made empty for a layer that saw
        no input, which :func:`_update` then names). The feed lets go of them: whoever
        drops an entry of the returned dict frees it."""
        made, self.stats = self.stats, {}
        self._x, self._fed, self._made = None, [], []
        return {n: made[n] if n in made else self.make(n, m) for n, m in self.modules.items()}


def _update(
    update: Callable[[dict[str, nn.Module], dict[str, A]], None],
    group: dict[str, nn.Module],
    stats: dict[str, A],
) -> None:
    for name in stats:  # no loop variable left holding an accumulator (a Hessian) alive
        if stats[name].tokens == 0:
            raise ValueError(f"layer {name!r} saw no calibration inputs")
    if group:
        update(group, stats)
