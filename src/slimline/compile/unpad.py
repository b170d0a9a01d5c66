"""``unpad``: a BERT-like encoder that computes only the real tokens of a padded batch.

A batch of sentences is padded to its longest: on the built-in ``minilm`` test batches 37 %
of the positions are real tokens (one of 32 × 46 holds 633). A padded position costs what a
real one does in every linear layer, layer norm and activation, and its output is thrown away
(pooling and every head read only the real positions). This step removes the padding inside
the model, as ByteTransformer does on GPUs (Zhai et al., "ByteTransformer: A High-Performance
Transformer Boosted for Variable-Length Inputs", IPDPS 2023, arXiv 2210.03052): the
embeddings run on the batch as given, the real tokens are gathered into one (tokens, hidden)
matrix, and each layer's query/key/value projections, attention output, feed-forward and norms
run on that matrix, and so does attention: each sentence's queries over its own keys, one C
call a layer (:mod:`slimline.compile.varlen_attention`). Where that kernel cannot run (no C
compiler, autograd, heads not a multiple of 8 columns wide, neither float32 nor bfloat16), or
would be slower (long rows with little padding: ``varlen_attention.pays``), the packed rows
are scattered to the padded (batch, heads, length, head) layout for one attention with the key
padding mask and gathered back. The model's own submodules run on the packed
tokens (so quantized, cast or hooked layers run as they are); a real token's output equals the
padded model's to float rounding, since every step but attention is per token and attention
sees the real keys only.

What changes: positions the mask marks as padding hold zeros in ``last_hidden_state`` (the
padded model leaves values there that nothing should read). The pooler reads position 0 as it
does. Every call the step does not cover runs the model's own forward unchanged: no
``attention_mask`` or no padding in it, training mode, hidden states or attention weights
asked for, cross-attention, ``inputs_embeds``, any other argument.

Scope: encoders laid out as transformers' BERT (``embeddings``, ``encoder.layer[i]`` with
``attention.self.{query,key,value}``, ``attention.output``, ``intermediate``, ``output``,
``pooler``) without cross-attention: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, MiniLM and
sentence-transformers models built on them. ``sl.export`` and runtime backends write the padded
graph (a token count that depends on the data is not one static graph): the export runs with
the step switched off, and ``compile backend: openvino | onnxruntime`` refuses a model that has
it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimline.compile import varlen_attention as varlen
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.search.ranges import SearchSpace

# The arguments of a BERT-like model's forward this step runs itself (each at the value the
# model's own forward also takes as "not asked for"); any other argument, or one of these at
# another value, runs the model's forward.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_OFF = {"inputs_embeds": None, "encoder_hidden_states": None, "encoder_attention_mask": None,
        "cache": None, "past_key_values": None, "use_cache": (None, False),
        "output_attentions": (None, False), "output_hidden_states": (None, False),
        "return_dict": (None, True)}


@dataclass(frozen=True, kw_only=True)
class UnpadConfig(MethodConfig):
    """Run a BERT-like encoder's layers on the real tokens of a padded batch only."""

    method: ClassVar[str] = "unpad"
    family: ClassVar[Family] = Family.RUNTIME
    summary: ClassVar[str] = "BERT-like encoders compute only the real tokens of padded batches"
    paper: ClassVar[str] = "ByteTransformer, Zhai et al., IPDPS 2023 (arXiv 2210.03052)"
    reapply_on_load: ClassVar[bool] = True  # the replaced forward is not a tensor
    # Nothing to tune: `slimline search` tries it on or off on encoders it runs.
    search_space: ClassVar[SearchSpace] = {}

    # A model without an encoder this step runs: refused (the default), or left padded with a
    # note, so that one recipe serves encoders of other layouts too (recipes/encoder-cpu-*).
    if_unsupported: Literal["refuse", "skip"] = "refuse"

    def check(self) -> None:
        if self.targets.include or self.targets.exclude:
            self.fail("targets", "unpad applies to the whole encoder; remove targets")

    def applies_to(self, model: nn.Module) -> bool:
        return self.if_unsupported == "skip" or not isinstance(encoders(model), str)

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """The encoders whose forward it replaces (no layer is). Raises (naming the step) for
        a model it cannot run, unless ``if_unsupported: skip``."""
        found = encoders(model)
        if isinstance(found, str):
            if self.if_unsupported == "refuse":
                raise ValueError(f"{step or self.method}: {found} (if_unsupported: skip leaves "
                                 "such a model padded)")
            return []
        return found


def encoders(model: nn.Module) -> list[tuple[str, nn.Module]] | str:
    """The BERT-like encoder modules in ``model`` (itself or a child such as ``bert``), or why
    there is none this step can run."""
    found, problems = [], []
    for name, module in model.named_modules():
        if not (hasattr(module, "embeddings") and hasattr(module, "encoder")):
            continue
        problem = _encoder_problem(module)
        if problem is None:
            found.append((name, module))
        else:
            problems.append(f"{name or type(module).__name__}: {problem}")
    if found:
        return found
    if problems:
        return "; ".join(problems)
    return (f"{type(model).__name__} has no BERT-like encoder (a module with embeddings, "
            "encoder.layer and pooler, as transformers' BertModel)")


def _encoder_problem(base: nn.Module) -> str | None:
    config = getattr(base, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder (causal or cross-attention) is not an encoder this step unpads"
    if not hasattr(base, "pooler"):
        return f"{type(base).__name__} has no pooler attribute: not the BERT layout"
    current = vars(base).get("forward")
    if current is not None and not isinstance(current, UnpaddedForward):
        return f"{type(base).__name__}.forward is already replaced; it cannot be wrapped"
    if "attention_mask" not in inspect.signature(type(base).forward).parameters:
        return f"{type(base).__name__}.forward takes no attention_mask"
    layers = getattr(base.encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"{type(base.encoder).__name__} has no layer list"
    for i, layer in enumerate(layers):
        attention = getattr(layer, "attention", None)
        self_attention = getattr(attention, "self", None)
        for part, owner in [("attention.self", self_attention), ("attention.output",
                            getattr(attention, "output", None)), ("intermediate", getattr(
                            layer, "intermediate", None)), ("output", getattr(layer, "output",
                            None))]:  # fmt: skip
            if not isinstance(owner, nn.Module):
                return f"layer {i} has no {part}"
        for field in ("query", "key", "value", "attention_head_size", "scaling"):
            if not hasattr(self_attention, field):
                return f"layer {i}: {type(self_attention).__name__} has no {field}"
        if getattr(self_attention, "position_embedding_type", "absolute") != "absolute":
            return f"layer {i}: relative position embeddings are not written out here"
    return None


def pack_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (row-major over (batch, length)) of the real tokens of a 0/1 mask."""
    return (mask.reshape(-1) != 0).nonzero().squeeze(1)


def scatter(tokens: torch.Tensor, index: torch.Tensor, positions: int) -> torch.Tensor:
    """(positions, width) with ``tokens`` (T, width) at ``index`` and zeros elsewhere."""
    return tokens.new_zeros(positions, tokens.shape[-1]).index_copy(0, index, tokens)


# Padded attention (where the varlen kernel cannot run): up to this many positions a row,
# attention written out (two matmuls and a softmax, which TorchInductor fuses with the gathers
# around them) ran faster than torch's fused kernel: minilm
# with smoothquant static + unpad + compile, 2 threads, AVX-512 VNNI, written-out ÷ fused time:
# 32 positions 0.91, 64 0.99, 128 1.03, 192 1.15, 256 1.18.
WRITTEN_OUT_MAX = 64


def written_out(implementation: str | None, length: int) -> bool:
    """Whether the packed layers write attention out (transformers' ``eager`` implementation,
    or short rows under any other) rather than call torch's fused kernel."""
    return implementation == "eager" or length <= WRITTEN_OUT_MAX


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
              scaling: float, eager: bool) -> torch.Tensor:
    """Softmax attention (Vaswani et al., arXiv 1706.03762) of heads (B, H, L, D) over the
    keys ``keep`` (B, L) marks real; ``eager``: written out as transformers' eager path does,
    else torch's fused kernel (its ``sdpa`` path). The same function either way."""
    visible = keep.bool()[:, None, None, :]
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def packed_layer(layer: Any, h: torch.Tensor, index: torch.Tensor, keep: torch.Tensor,
                 starts: torch.Tensor | None, eager: bool) -> torch.Tensor:
    """One BERT layer on the packed tokens ``h`` (T, hidden): post-norm self-attention and
    feed-forward (Devlin et al., arXiv 1810.04805) through the layer's own submodules
    (``layer``: a BertLayer-shaped module, checked by :func:`encoders`). Attention runs on the
    packed rows (:mod:`slimline.compile.varlen_attention`, sequence b in rows ``starts[b]`` to
    ``starts[b + 1] - 1``) where its C kernel takes them, else (or ``starts`` None: the kernel
    would not pay on this batch) in the padded layout."""
    block = layer.attention.self
    batch, length = keep.shape
    size = int(block.attention_head_size)
    q, k, v = block.query(h), block.key(h), block.value(h)
    if starts is not None and not varlen.unsupported(q, k, v, size):
        mixed = varlen.varlen_attention(q, k, v, starts, q.shape[-1] // size,
                                        float(block.scaling))
    else:

        def heads(t: torch.Tensor) -> torch.Tensor:
            return scatter(t, index, batch * length).view(batch, length, -1, size).transpose(1, 2)

        mixed = attention(heads(q), heads(k), heads(v), keep, float(block.scaling), eager)
        mixed = mixed.transpose(1, 2).reshape(batch * length, -1).index_select(0, index)
    h = layer.attention.output(mixed, h)
    out: torch.Tensor = layer.output(layer.intermediate(h), h)
    return out


class UnpaddedForward:
    """The replacement ``forward`` of a BERT-like model: padded batches through the packed
    layers, every other call through the class's forward. Holds the model, so
    ``copy.deepcopy`` of the model points the copy's at the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.enabled = True
        self.calls = 0  # calls it ran itself (tests and benchmarks read it)
        params = [p.name for p in inspect.signature(type(model).forward).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]  # past self
        self.positions = {name: i for i, name in enumerate(params)}
        self.__signature__ = inspect.signature(type(model).forward.__get__(model))
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        self.output = BaseModelOutputWithPoolingAndCrossAttentions

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan(args, kwargs)
        if plan is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        inputs, index, kernel = plan
        mask = inputs.pop("attention_mask")
        model: Any = self.model
        embedded = model.embeddings(**inputs)
        batch, length, width = embedded.shape
        h = embedded.reshape(batch * length, width).index_select(0, index)
        eager = written_out(getattr(model.config, "_attn_implementation", None), length)
        starts = varlen.starts_of(mask) if kernel else None
        for layer in model.encoder.layer:
            h = packed_layer(layer, h, index, mask, starts, eager)
        hidden = scatter(h, index, batch * length).view(batch, length, -1)
        pooled = model.pooler(hidden) if model.pooler is not None else None
        return self.output(last_hidden_state=hidden, pooler_output=pooled)

    @torch.compiler.disable  # type: ignore[misc]
    def _plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[dict[str, Any], torch.Tensor, bool] | None:  # fmt: skip
        """The embedding inputs with the mask, the real tokens' positions, and whether the
        varlen kernel pays on this batch (:func:`slimline.compile.varlen_attention.pays`),
        when this call is one the packed path runs. Not traced by torch.compile: whether a
        batch has padding, how many tokens it keeps and how long its sentences are depend on
        the data; the compiled layers take the positions as an input of dynamic size, and
        the choice of attention as a constant (two graphs at most)."""
        inputs = self._inputs(args, kwargs)
        if inputs is None:
            return None
        self.calls += 1
        mask = inputs["attention_mask"]
        return inputs, pack_index(mask), varlen.pays(mask)

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The embedding inputs and the mask when this call is one the packed path runs."""
        if not self.enabled or self.model.training:
            return None
        given = dict(kwargs)
        for name, position in self.positions.items():
            if position < len(args):
                if name in given:
                    return None
                given[name] = args[position]
        if len(args) > len(self.positions):
            return None
        for name, value in given.items():
            if name in _INPUTS:
                continue
            allowed = _OFF.get(name, ())
            if not any(value is a for a in (allowed if isinstance(allowed, tuple) else (allowed,))):
                return None
        mask, ids = given.get("attention_mask"), given.get("input_ids")
        if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor):
            return None
        if mask.dim() != 2 or mask.shape != ids.shape or bool((mask != 0).all()):
            return None  # nothing to remove: the model's own forward, bit for bit
        return {name: given[name] for name in _INPUTS if given.get(name) is not None}


def forwards(model: nn.Module) -> list[UnpaddedForward]:
    """This step's forwards in ``model`` (one for each encoder it replaced)."""
    return [f for m in model.modules() if isinstance(f := vars(m).get("forward"), UnpaddedForward)]


def installed(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs this step's forward."""
    return bool(forwards(model))


@contextlib.contextmanager
def switched_off(model: nn.Module) -> Iterator[None]:
    """Every call inside runs the padded model's own forward (for exporters, which trace one
    graph whose shapes cannot depend on the data)."""
    found = forwards(model)
    before = [f.enabled for f in found]
    for f in found:
        f.enabled = False
    try:
        yield
    finally:
        for f, was in zip(found, before, strict=True):
            f.enabled = was


@register(UnpadConfig)
def apply_unpad(model: nn.Module, cfg: UnpadConfig, ctx: StepContext) -> StepOutcome:
    """Give each BERT-like encoder in ``model`` the packed forward (idempotent: ``sl.load``
    runs it again)."""
    found = encoders(model)
    if isinstance(found, str):
        cfg.select_modules(model)  # raises with the reason, unless told to skip such a model
        return StepOutcome(modules=[], notes=[f"left padded: {found}"])
    for _, base in found:
        base.forward = UnpaddedForward(base)  # type: ignore[method-assign]
    return StepOutcome(modules=[name for name, _ in found], notes=[
        "padded batches run their real tokens only; padded positions of last_hidden_state "
        "are zero; other calls run the model's forward"])
