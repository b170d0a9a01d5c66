"""Coupled units: which tensors lose the same rows or columns together.

A *unit* is what structured pruning removes: an attention head (or a KV group of heads), an
MLP neuron, a conv channel. Removing one touches several tensors at once — a Llama neuron is
a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj`` — and DepGraph
(arXiv 2301.12900) and LLM-Pruner (arXiv 2305.11627) call such a coupled set a *group*. This
module only finds the groups; importance lives in ``structured.py``, surgery in ``surgery.py``.

Layouts are recognised by structure (attribute names), not class names:

* Llama-style blocks (Llama, Mistral, Qwen2...): ``self_attn.{q,k,v,o}_proj`` and
  ``mlp.{gate,up,down}_proj``; heads are GQA-aware (whole KV groups, or query heads evenly
  within every group, so ``num_attention_heads % num_key_value_heads == 0`` still holds);
* their fused form (Phi-3): ``self_attn.qkv_proj`` + ``o_proj`` and ``mlp.gate_up_proj`` +
  ``down_proj``, the same units cut from each run of rows of the fused layer;
* GPT-NeoX blocks (Pythia): ``attention.query_key_value`` (per-head ``[q | k | v]`` rows) +
  ``attention.dense``, ``mlp.dense_h_to_4h`` + ``mlp.dense_4h_to_h``;
* BERT-style blocks: ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``;
* plain feed-forward nets traced with ``torch.fx`` (the ``digits-cnn`` pattern): a Conv2d whose
  output goes, through BatchNorm and channel-wise ops (activations, pooling, dropout), into
  exactly one Conv2d, or through ``flatten`` into one Linear; a Linear into one Linear.
  Residual adds, concatenations and fan-out are refused with the blocking operation named.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.nn import functional as F

from slimline.core.calibration import find_blocks
from slimline.prune.surgery import Axis, SliceSpec, layer_weight

UnitKind = Literal["heads", "neurons", "channels"]
GqaMode = Literal["kv_groups", "queries"]
Finish = Callable[[nn.Module, int], None]  # (model, units kept) → update attributes / config


@dataclass(frozen=True)
class TensorSlice:
    """One layer's share of a unit: ``width`` consecutive features along ``axis``."""

    module: str
    axis: Axis
    width: int
    record_shape: bool = False  # the config cannot describe the new shape (surgery.SlicedLinear)
    offset: int = 0  # where the units' run starts: a fused layer has several (Phi-3 qkv_proj)

    def __post_init__(self) -> None:
        if self.axis == "in" and self.offset:  # consumers' columns are ranked and refit whole
            raise ValueError(f"{self.module}: an input-axis slice must start at feature 0")


@dataclass(frozen=True)
class UnitGroup:
    """``n_units`` units whose slices in ``slices`` are removed together (a DepGraph group)."""

    name: str  # the owning module, e.g. "model.layers.0.mlp"
    kind: UnitKind
    n_units: int
    slices: tuple[TensorSlice, ...]
    partitions: int = 1  # equal runs of units that must each lose the same count (GQA queries)
    uniform: bool = False  # one config value for every block: all blocks must be pruned alike
    finish: Finish | None = None
    # Config values that blocks read at forward time, written once every block is cut (the
    # block's own module gets them at ``finish``): Phi-3 splits qkv_proj's output at
    # config.num_attention_heads · head_dim, so the shared config must not change earlier.
    settle: Finish | None = None

    @property
    def specs(self) -> list[SliceSpec]:
        return [(s.module, s.axis, s.width, s.record_shape, s.offset) for s in self.slices]

    def producers(self) -> list[str]:
        return list(dict.fromkeys(s.module for s in self.slices if s.axis == "out"))

    def consumers(self) -> list[TensorSlice]:
        return [s for s in self.slices if s.axis == "in"]


def set_config(model: nn.Module, **values: int) -> None:
    """Write ``values`` into every distinct Hugging Face config object the model holds."""
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_json_file") and id(config) not in seen:
            seen.add(id(config))
            for key, value in values.items():
                setattr(config, key, value)


# ---------------------------------------------------------------- transformer blocks


def _child(owner: nn.Module | None, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` under ``owner``, or None."""
    for part in path.split("."):
        owner = getattr(owner, part, None) if owner is not None else None
    return owner if isinstance(owner, nn.Module) else None


def _linear(owner: nn.Module | None, path: str) -> nn.Linear:
    module = _child(owner, path)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"expected a Linear at {path!r}")
    return module


def _has(owner: nn.Module | None, linears: tuple[str, ...], ints: tuple[str, ...] = ()) -> bool:
    """``owner`` has Linear layers at ``linears`` and integer attributes ``ints``."""
    return owner is not None and all(
        isinstance(_child(owner, p), nn.Linear) for p in linears
    ) and all(isinstance(getattr(owner, a, None), int) for a in ints)


def _set_intermediate(model: nn.Module, kept: int) -> None:
    """The ``finish`` of an MLP's neurons: the config's ``intermediate_size``."""
    set_config(model, intermediate_size=kept)


def _set(module: nn.Module, attribute: str, value: int) -> None:
    """Set a plain int attribute (a head count) that the module reads at forward time."""
    setattr(module, attribute, value)


def _llama_heads(name: str, attn: nn.Module, gqa: GqaMode) -> UnitGroup:
    """q/k/v rows and o_proj columns of each head; KV heads are shared by ``r`` query heads.

    Query heads ``g·r .. g·r+r-1`` read KV head ``g`` (``repeat_kv``), so a KV group is a run
    of ``r·head_dim`` q rows plus ``head_dim`` k and v rows.
    """
    hd, r = int(getattr(attn, "head_dim")), int(getattr(attn, "num_key_value_groups"))  # noqa: B009
    n_kv = _linear(attn, "k_proj").out_features // hd
    q, k, v, o = (f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    slices: tuple[TensorSlice, ...]
    if gqa == "kv_groups":
        slices = (TensorSlice(q, "out", r * hd), TensorSlice(k, "out", hd),
                  TensorSlice(v, "out", hd), TensorSlice(o, "in", r * hd))

        def finish_groups(model: nn.Module, kept: int) -> None:
            set_config(model, num_key_value_heads=kept, num_attention_heads=kept * r, head_dim=hd)

        return UnitGroup(name, "heads", n_kv, slices, uniform=True, finish=finish_groups)

    slices = (TensorSlice(q, "out", hd), TensorSlice(o, "in", hd))

    def finish_queries(model: nn.Module, kept: int) -> None:
        _set(model.get_submodule(name), "num_key_value_groups", kept // n_kv)
        set_config(model, num_attention_heads=kept, head_dim=hd)

    return UnitGroup(name, "heads", n_kv * r, slices, n_kv, uniform=True, finish=finish_queries)


def _llama_neurons(name: str, mlp: nn.Module) -> UnitGroup:
    slices = (TensorSlice(f"{name}.gate_proj", "out", 1), TensorSlice(f"{name}.up_proj", "out", 1),
              TensorSlice(f"{name}.down_proj", "in", 1))

    def finish(model: nn.Module, kept: int) -> None:
        _set(model.get_submodule(name), "intermediate_size", kept)
        _set_intermediate(model, kept)

    n = _linear(mlp, "down_proj").in_features
    return UnitGroup(name, "neurons", n, slices, uniform=True, finish=finish)


def _fused_heads(name: str, attn: nn.Module, gqa: GqaMode) -> UnitGroup:
    """Phi-3's attention: one ``qkv_proj`` whose rows are the query heads, then the key heads,
    then the value heads (``H·hd | KV·hd | KV·hd``); the same units as :func:`_llama_heads`,
    each a slice of every run it has rows in.

    The forward splits ``qkv_proj``'s output at ``config.num_attention_heads · head_dim`` and
    ``self.num_key_value_heads · head_dim``, so both are updated with the kept counts.
    """
    hd, r = int(getattr(attn, "head_dim")), int(getattr(attn, "num_key_value_groups"))  # noqa: B009
    n_kv = int(getattr(attn, "num_key_value_heads"))  # noqa: B009
    qkv, o = f"{name}.qkv_proj", f"{name}.o_proj"
    queries = n_kv * r * hd
    slices: tuple[TensorSlice, ...]
    if gqa == "kv_groups":  # a unit: r query heads, their key head and value head
        slices = (TensorSlice(qkv, "out", r * hd), TensorSlice(qkv, "out", hd, offset=queries),
                  TensorSlice(qkv, "out", hd, offset=queries + n_kv * hd),
                  TensorSlice(o, "in", r * hd))  # fmt: skip
        units, partitions = n_kv, 1
    else:  # a unit: one query head, as many kept in every KV group
        slices = (TensorSlice(qkv, "out", hd), TensorSlice(o, "in", hd))
        units, partitions = n_kv * r, n_kv

    def heads(kept: int) -> tuple[int, int]:
        """(query heads, key/value heads) left when ``kept`` units stay."""
        return (kept * r, kept) if gqa == "kv_groups" else (kept, n_kv)

    def finish(model: nn.Module, kept: int) -> None:
        module = model.get_submodule(name)
        h, kv = heads(kept)
        _own_config(module, num_attention_heads=h, num_key_value_heads=kv)
        _set(module, "num_key_value_heads", kv)
        _set(module, "num_key_value_groups", h // kv)

    def settle(model: nn.Module, kept: int) -> None:
        h, kv = heads(kept)
        set_config(model, num_attention_heads=h, num_key_value_heads=kv, head_dim=hd)
        _shared_config(model, name)

    return UnitGroup(name, "heads", units, slices, partitions, uniform=True, finish=finish,
                     settle=settle)  # fmt: skip


def _shared_config(model: nn.Module, name: str) -> None:
    """Point the module back at the model's config (now with the new sizes), so that later
    changes to it (``set_attn_implementation``) reach the module again."""
    config = getattr(model, "config", None)
    if config is not None:
        model.get_submodule(name).config = config


def _own_config(module: nn.Module, **values: int) -> None:
    """Give ``module`` a copy of its config with ``values``, so that it runs at its new sizes
    while the blocks not yet cut keep reading the shared one (until ``settle``)."""
    config = copy.copy(getattr(module, "config"))  # noqa: B009
    for key, value in values.items():
        setattr(config, key, value)
    module.config = config


def _fused_neurons(name: str, mlp: nn.Module) -> UnitGroup:
    """Phi-3's MLP: ``gate_up_proj`` holds the gate rows then the up rows (the forward
    ``chunk``s its output in two), ``down_proj`` reads the neurons."""
    n = _linear(mlp, "down_proj").in_features
    fused = f"{name}.gate_up_proj"
    slices = (TensorSlice(fused, "out", 1), TensorSlice(fused, "out", 1, offset=n),
              TensorSlice(f"{name}.down_proj", "in", 1))  # fmt: skip
    return UnitGroup(name, "neurons", n, slices, uniform=True, finish=_set_intermediate)


def _neox_heads(name: str, attn: nn.Module) -> UnitGroup:
    """GPT-NeoX (Pythia): ``query_key_value``'s rows are per head, ``[q | k | v]`` of
    ``head_size`` each, and ``dense`` reads the heads. The forward infers the head count
    (``view(..., -1, 3·head_size)``), while the config can only say ``hidden / heads``: as for
    BERT, the config keeps its head count and both layers record their shapes."""
    hd = int(getattr(attn, "head_size"))  # noqa: B009
    slices = (TensorSlice(f"{name}.query_key_value", "out", 3 * hd, True),
              TensorSlice(f"{name}.dense", "in", hd, True))  # fmt: skip
    n_heads = _linear(attn, "query_key_value").out_features // (3 * hd)
    return UnitGroup(name, "heads", n_heads, slices, uniform=True)


def _neox_neurons(name: str, mlp: nn.Module) -> UnitGroup:
    slices = (TensorSlice(f"{name}.dense_h_to_4h", "out", 1),
              TensorSlice(f"{name}.dense_4h_to_h", "in", 1))  # fmt: skip
    n = _linear(mlp, "dense_4h_to_h").in_features
    return UnitGroup(name, "neurons", n, slices, uniform=True, finish=_set_intermediate)


def _bert_heads(name: str, attn: nn.Module) -> UnitGroup:
    """query/key/value rows and the output dense's columns, ``attention_head_size`` each.

    transformers 5 derives BERT's head size from ``hidden_size / num_attention_heads`` and has
    no ``pruned_heads``, so the config keeps the original head count and the four layers record
    their own shapes (``record_shape``); the module's head count is updated for readers.
    """
    inner = f"{name}.self"
    hd = int(getattr(_child(attn, "self"), "attention_head_size"))  # noqa: B009
    slices = tuple(TensorSlice(f"{inner}.{p}", "out", hd, True) for p in ("query", "key", "value"))
    slices += (TensorSlice(f"{name}.output.dense", "in", hd, True),)

    def finish(model: nn.Module, kept: int) -> None:
        module = model.get_submodule(inner)
        _set(module, "num_attention_heads", kept)
        _set(module, "all_head_size", kept * hd)

    n_heads = _linear(attn, "self.query").out_features // hd
    return UnitGroup(name, "heads", n_heads, slices, uniform=True, finish=finish)


def _bert_neurons(name: str, block: nn.Module) -> UnitGroup:
    slices = (TensorSlice(f"{name}.intermediate.dense", "out", 1),
              TensorSlice(f"{name}.output.dense", "in", 1))
    n = _linear(block, "intermediate.dense").out_features
    return UnitGroup(f"{name}.intermediate", "neurons", n, slices, uniform=True,
                     finish=_set_intermediate)  # fmt: skip


def _block_group(name: str, block: nn.Module, kind: UnitKind, gqa: GqaMode) -> UnitGroup | None:
    """The group of ``kind`` in one block, for the layouts this module knows; else None."""
    if kind == "heads":
        attn, attention = _child(block, "self_attn"), _child(block, "attention")
        if attn is not None and _has(attn, ("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("head_dim", "num_key_value_groups")):
            return _llama_heads(f"{name}.self_attn", attn, gqa)
        if attn is not None and _has(attn, ("qkv_proj", "o_proj"),
                                     ("head_dim", "num_key_value_groups", "num_key_value_heads")):
            return _fused_heads(f"{name}.self_attn", attn, gqa)
        if attention is not None and _has(attention, ("query_key_value", "dense"), ("head_size",)):
            return _neox_heads(f"{name}.attention", attention)
        bert_linears = ("self.query", "self.key", "self.value", "output.dense")
        head_size = _has(_child(attention, "self"), (), ("attention_head_size",))
        if attention is not None and _has(attention, bert_linears) and head_size:
            return _bert_heads(f"{name}.attention", attention)
    if kind == "neurons":
        mlp = _child(block, "mlp")
        if mlp is not None and _has(mlp, ("gate_proj", "up_proj", "down_proj")):
            return _llama_neurons(f"{name}.mlp", mlp)
        if mlp is not None and _has(mlp, ("gate_up_proj", "down_proj")):
            return _fused_neurons(f"{name}.mlp", mlp)
        if mlp is not None and _has(mlp, ("dense_h_to_4h", "dense_4h_to_h")):
            return _neox_neurons(f"{name}.mlp", mlp)
        if _has(block, ("intermediate.dense", "output.dense")):
            return _bert_neurons(name, block)
    return None


def describe_blocks(model: nn.Module) -> str:
    """`` (its blocks P.* are Cls, ...)`` for error messages; empty without a block list."""
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        return ""
    return f" (its blocks {prefix}.* are {type(blocks[0]).__name__}, a layout not supported)"


def transformer_groups(model: nn.Module, kind: UnitKind, gqa: GqaMode) -> list[UnitGroup] | None:
    """One group per block for ``kind``; None when the model has no transformer block list.

    ValueError names the block class when blocks exist but their layout is not supported.
    """
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        return None
    if not any(_block_group("b", b, k, gqa) for b in blocks[:1] for k in ("heads", "neurons")):
        return None  # a list of repeated modules, but not transformer blocks: not ours
    groups = []
    for i, block in enumerate(blocks):
        group = _block_group(f"{prefix}.{i}", block, kind, gqa)
        if group is None:
            what = "attention" if kind == "heads" else "MLP"
            raise ValueError(
                f"block {prefix}.{i} ({type(block).__name__}) has no supported {what} "
                "layout (Llama-style q/k/v/o_proj + gate/up/down_proj, fused Phi-3-style "
                "qkv_proj + gate_up_proj, GPT-NeoX query_key_value + dense_h_to_4h, or "
                "BERT-style attention.self.query/key/value + intermediate/output.dense)"
            )
        groups.append(group)
    return groups


# ---------------------------------------------------------------- traced feed-forward nets

_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Mish, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)
_CHANNELWISE_FUNCTIONS: set[Any] = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu,
    F.hardswish, F.mish, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


def _only_input(user: fx.Node, node: fx.Node) -> bool:
    """``node`` is the first argument of ``user`` and no other argument is a tensor."""
    others = [a for a in (*user.args[1:], *user.kwargs.values()) if isinstance(a, fx.Node)]
    return bool(user.args) and user.args[0] is node and not others


def _is_flatten(user: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``flatten(x, 1)`` in any spelling: channel-major, so channel c owns a run of features."""
    if user.op == "call_module":
        m = modules[str(user.target)]
        return isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1)
    named = (user.op == "call_method" and user.target == "flatten") or (
        user.op == "call_function" and user.target is torch.flatten
    )
    start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
    end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
    return named and (start, end) == (1, -1)


def _channelwise(user: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if user.op == "call_module":
        return isinstance(modules[str(user.target)], _CHANNELWISE_MODULES)
    if user.op == "call_function":
        return user.target in _CHANNELWISE_FUNCTIONS
    return user.op == "call_method" and user.target in _CHANNELWISE_METHODS


def _describe(user: fx.Node, modules: dict[str, nn.Module]) -> str:
    if user.op == "call_module":
        return f"{user.target} ({type(modules[str(user.target)]).__name__})"
    return getattr(user.target, "__name__", str(user.target))


def _follow(
    node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]
) -> tuple[UnitGroup | None, str | None]:
    """Walk from producer ``node`` to its one consumer; (group, None) or (None, why not).

    (None, None) means the output reaches the model's output: a head, never pruned.
    """
    name = str(node.target)
    producer = modules[name]
    units = int(layer_weight(producer).shape[0])  # out_channels / out_features
    kind: UnitKind = "channels" if isinstance(producer, nn.Conv2d) else "neurons"
    slices, current, flat = [TensorSlice(name, "out", 1)], node, False
    if calls[name] > 1:
        return None, "the layer is called more than once"
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None, f"its output is used by {len(users)} operations (fan-out, residual)"
        user = users[0]
        if user.op == "output":
            return None, None
        if not _only_input(user, current):
            return None, f"it reaches {_describe(user, modules)} with other tensor inputs"
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not flat:
            slices.append(TensorSlice(str(user.target), "out", 1))
        elif _is_flatten(user, modules):
            flat = True
        elif not _channelwise(user, modules):
            break
        current = user
    consumer = str(user.target)
    if isinstance(module, nn.Conv2d) and module.groups == 1 and kind == "channels" and not flat:
        width = 1
    elif isinstance(module, nn.Linear) and (flat or kind == "neurons"):
        width = module.in_features // units
        if width * units != module.in_features:
            return None, f"{consumer} has {module.in_features} inputs, not a multiple of {units}"
    else:
        return None, f"it reaches {_describe(user, modules)}, which is not supported"
    if calls.get(consumer, 0) > 1:
        return None, f"its consumer {consumer} is called more than once"
    slices.append(TensorSlice(consumer, "in", width))
    return UnitGroup(name, kind, units, tuple(slices)), None


def sequential_groups(model: nn.Module, kind: UnitKind) -> dict[str, UnitGroup | str]:
    """Per producer layer of ``kind`` (Conv2d for channels, Linear for neurons): its group,
    or the reason it cannot be pruned. Output heads are left out. ValueError if untraceable.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx to find coupled layers "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    wanted = nn.Conv2d if kind == "channels" else nn.Linear
    found: dict[str, UnitGroup | str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[str(node.target)], wanted):
            if str(node.target) in found:
                continue
            group, why = _follow(node, modules, calls)
            if group is not None or why is not None:
                found[str(node.target)] = group if group is not None else str(why)
    return found
