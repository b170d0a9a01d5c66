"""``fast_decode``: a one-token decode step for Llama-family causal LMs, written out.

At batch 1 a decode step of a quantized model spends its time in two places: the matmuls,
which stream the weights (slimline's gemv kernels, near the memory bandwidth), and everything
between them — norms, rotary embedding, attention over the cache, residuals — which is little
arithmetic but, through transformers' modules, many Python calls, keyword plumbing, a mask
built and a position computed every step. Measured on ``llama-1b-random`` (rtn int4 g128, 2
threads): ~20 ms of a ~68 ms token outside the matmuls (``benchmarks/decode_breakdown.py``);
llama.cpp's C loop keeps that part to a few ms. ``torch.compile`` of the step did not shorten
it here (BENCHMARKS, issue 13 notes).

This step replaces the model's ``forward`` (on the instance; class, parameters and
``state_dict`` unchanged, ``sl.load`` applies it again) by one that runs a decode step — one
new token of one sequence on top of a dynamic KV cache, no gradient, or up to
:data:`MOST_TOKENS` of them on a filled cache, as a speculative round verifies its draft
(attention then causal among the new positions) — as a short loop over
the blocks calling the model's own submodules (so quantized, cast or hooked layers run as
they are) with the maths of the block inlined: RMSNorm, rotary embedding (the model's own
``rotary_emb``, so its scaling applies), the new key and value appended to the cache (in
place into room kept behind transformers' dynamic layers, :mod:`slimline.compile.kv_room`;
through the cache's public ``update`` for any other layer), attention over the cached keys
with grouped heads (no repeated keys; one query sees every cached position, several a causal
mask), SwiGLU MLP. A
block whose seven projections are slimline's packed layers on its gemv kernels (float32
activations, no hooks) runs a one-token step as one C call instead
(:mod:`slimline.compile.decode_block`: the same maths, the Python between the kernels gone).
Every other call
— prefill, batches, padding, a static cache, training, attention weights or hidden states
asked for — runs the model's own forward unchanged. The step follows the dense Llama block
(Touvron et al., arXiv 2302.13971) exactly; decode is memory-bound (Pope et al., arXiv
2211.05102), so what it saves is the time between the weight reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimline.compile import decode_block, decode_ops
from slimline.compile.kv_room import advance, append_in_place, filled, reserve
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.quantize import kernels_gemv

# Decoder-only families whose blocks are the dense Llama block (pre-norm RMSNorm, rotary
# q/k, grouped-query attention, gated MLP); biases on q/k/v (Qwen2) live in the projections.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True, kw_only=True)
class FastDecodeConfig(MethodConfig):
    """Run batch-1 decode steps of a Llama-family causal LM through a written-out block loop."""

    method: ClassVar[str] = "fast_decode"
    family: ClassVar[Family] = Family.COMPILE
    summary: ClassVar[str] = (
        "decode steps (one token, or a speculative draft's few) of a Llama-family LM without "
        "the framework's per-token Python"
    )
    paper: ClassVar[str] = "Pope et al., arXiv 2211.05102 (decode is memory-bound)"
    reapply_on_load: ClassVar[bool] = True

    def check(self) -> None:
        if self.targets.include or self.targets.exclude:
            self.fail("targets", "fast_decode applies to the whole model; remove targets")

    def applies_to(self, model: nn.Module) -> bool:
        return why_not(model) is None

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Nothing is replaced. Raises (naming the step) for a model it cannot run."""
        reason = why_not(model)
        if reason is not None:
            raise ValueError(f"{step or self.method}: {reason}")
        return []


def why_not(model: nn.Module) -> str | None:
    """Why ``model`` is not a causal LM whose decode step this module can write out."""
    from slimline.speculative import hf

    reason = hf.why_not(model)
    if reason is not None:
        return reason
    kind, config = type(model).__name__, getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return (f"{kind} (model_type {model_type!r}) is not one of the Llama-family types "
                f"whose block this step writes out: {', '.join(SUPPORTED_TYPES)}")
    current = vars(model).get("forward")
    if current is not None and not isinstance(current, FastForward):
        return f"{kind}.forward is already replaced on this model; it cannot be wrapped"
    base = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"{kind}.model has no {name}: not the Llama layout"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return f"{kind} has no lm_head module"
    for i, block in enumerate(base.layers):  # type: ignore[union-attr]
        problem = _block_problem(block)
        if problem is not None:
            return f"block {i}: {problem}"
    return None


def _block_problem(block: nn.Module) -> str | None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    parts = {"self_attn": attn, "mlp": mlp, "input_layernorm": getattr(block, "input_layernorm",
             None), "post_attention_layernorm": getattr(block, "post_attention_layernorm", None)}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        return f"{type(block).__name__} has no {', '.join(missing)}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"):
        if not hasattr(attn, name):
            return f"{type(attn).__name__} has no {name}"
    if getattr(attn, "sliding_window", None) is not None:
        return "sliding-window attention (a one-query step would see the whole cache)"
    for name in ("q_norm", "k_norm"):  # Qwen3: an RMSNorm over each head before rotary
        head_norm = getattr(attn, name, None)
        if head_norm is not None and not hasattr(head_norm, "variance_epsilon"):
            return f"{type(attn).__name__}.{name} is not an RMSNorm"
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(mlp, name):
            return f"{type(mlp).__name__} has no {name}"
    return None


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Llama's RMSNorm (Zhang & Sennrich, arXiv 1910.07467) as its module computes it:
    normalised in float32, cast to the weight's dtype and scaled by it, returned in x's dtype
    (a norm that ``half`` keeps in float32 casts its output back to the compute dtype)."""
    weight: torch.Tensor = norm.weight  # type: ignore[assignment]
    eps = float(norm.variance_epsilon)  # type: ignore[arg-type]
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (weight * normed.to(weight.dtype)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of heads ``x`` (..., D) at the positions ``cos`` / ``sin``
    broadcast to (RoFormer, arXiv 2104.09864), halves rotated as Llama's ``rotate_half``
    does."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attend_one(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of one query per head over every cached position, grouped-query
    (Ainslie et al., arXiv 2305.13245): q (H, D), keys and values (KV, L, D), H a multiple of
    KV, query head h reading key/value head h // (H / KV) as ``repeat_kv`` lays them out.
    Scores and softmax in float32. Returns (1, H·D)."""
    kv_heads, _, dim = keys.shape
    grouped = q.view(kv_heads, -1, dim)  # (KV, G, D)
    scores = torch.bmm(grouped, keys.transpose(1, 2)).float() * scale  # (KV, G, L)
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.bmm(weights, values).reshape(1, -1)


def attend_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Causal softmax attention of the last m positions' queries ``q`` (m, H, D) over the
    cache ``keys`` / ``values`` (KV, T, D) that ends with them: query i sees positions up to
    T - m + i; grouped heads as in :func:`attend_one`. Returns (m, H·D)."""
    m, total = q.shape[0], keys.shape[1]
    visible = (torch.arange(total, device=q.device)[None, :]
               <= torch.arange(total - m, total, device=q.device)[:, None])  # fmt: skip
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=visible, scale=scale,
        enable_gqa=True)  # (1, H, m, D)
    return out[0].transpose(0, 1).reshape(m, -1)


def decode_step(model: nn.Module, token: torch.Tensor, cache: Any,
                dynamic_layer: type | None = None, c_ops: bool = False,
                natives: dict[int, Any] | None = None, keep: int = 0) -> torch.Tensor:
    """The logits (1, keep or m, V) of the new tokens ``token`` (1, m) of one sequence — one
    at a time in decode, a few when a speculative round verifies its draft — their keys and
    values appended to ``cache`` in every block; the model's own forward computes the same.
    ``keep``: logits of the last ``keep`` positions only (0: all). Layers of type
    ``dynamic_layer`` (transformers' ``DynamicLayer``) are appended in place
    (:func:`append_in_place`), any other through the cache's ``update``. ``c_ops``: float32
    norms and rotary embedding of one token run as one C call each
    (:mod:`slimline.compile.decode_ops`), other dtypes and several tokens as torch ops.
    ``natives``: a dict this call may keep each block's C step in
    (:mod:`slimline.compile.decode_block`, for one token through blocks of packed layers
    appended in place), None for none."""
    base: Any = model.model  # type: ignore[union-attr]
    m = token.shape[-1]
    if natives is not None and (m != 1 or not _natives_may_run()):
        natives = None
    c_ops = c_ops and m == 1
    owned = False  # whether x is a tensor this step made (the C step writes into it)

    def norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        weight: Any = module.weight
        if c_ops and decode_ops.reads(x, weight):
            return decode_ops.rms_norm(x, weight, float(module.variance_epsilon))  # type: ignore[arg-type]
        return rms_norm(x, module)

    position = int(cache.get_seq_length())
    x = base.embed_tokens(token).view(m, -1)
    positions = torch.arange(position, position + m, device=x.device)[None]
    cos, sin = base.rotary_emb(x, position_ids=positions)
    cos, sin = cos.view(m, 1, -1), sin.view(m, 1, -1)  # (m, 1, D): every head of a position
    one = cos.view(1, -1), sin.view(1, -1)  # a one-token step's (1, D), as the C calls take
    for i, block in enumerate(base.layers):
        if not hasattr(block, "self_attn"):  # a block a self-draft skips (layer_skip)
            continue
        layer: Any = cache.layers[i] if i < len(cache.layers) else None
        in_place = type(layer) is dynamic_layer and filled(cache.layers[i])
        native = _native(natives, i, block, model) if in_place and natives is not None else None
        if native is not None and decode_ops.reads(x, cos, sin) and native.takes(layer):
            if not owned:
                x, owned = x.clone(), True
            keys, values = reserve(layer)
            native.step(x, keys, values, layer.keys.shape[-2], *one)
            advance(layer, (keys, values))
            continue
        attn, mlp = block.self_attn, block.mlp
        h = norm(x, block.input_layernorm)
        dim = attn.head_dim
        q, k = attn.q_proj(h).view(m, -1, dim), attn.k_proj(h).view(m, -1, dim)
        if "q_norm" in attn._modules:  # Qwen3 normalises each head before rotary
            q = rms_norm(q, attn.q_norm)
        if "k_norm" in attn._modules:
            k = rms_norm(k, attn.k_norm)
        if c_ops and decode_ops.reads(q, k, cos, sin):
            q, k = (decode_ops.rotate(q.view(-1, dim), *one),
                    decode_ops.rotate(k.view(-1, dim), *one))
        else:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        v = attn.v_proj(h).view(m, -1, dim)
        new_k, new_v = (t.view(m, -1, dim).transpose(0, 1)[None] for t in (k, v))  # (1, KV, m, D)
        if in_place:
            keys, values = append_in_place(layer, new_k, new_v)
        else:  # slimline's quantized layer (or an empty one): its own update
            keys, values = cache.update(new_k, new_v, i)
        mixed = (attend_one(q.view(-1, dim), keys[0], values[0], attn.scaling) if m == 1
                 else attend_rows(q.view(m, -1, dim), keys[0], values[0], attn.scaling))
        x, owned = x + attn.o_proj(mixed), True
        h = norm(x, block.post_attention_layernorm)
        x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
    if 0 < keep < m:
        x = x[m - keep:]
    logits: torch.Tensor = model.lm_head(norm(x, base.norm))  # type: ignore[operator]
    return logits.view(1, x.shape[0], -1)


def _natives_may_run() -> bool:
    """Whether this step may run blocks as one C call: not while a dispatch mode (a FLOP
    counter) or global module hooks watch, which see the Python step's ops and calls."""
    from torch.nn.modules import module as torch_module

    hooks = [getattr(torch_module, name, None) for name in
             ("_global_forward_hooks", "_global_forward_pre_hooks")]  # fmt: skip
    return not kernels_gemv.dispatch_mode_active() and not any(hooks)


def _native(natives: dict[int, Any], i: int, block: nn.Module, model: nn.Module) -> Any:
    """Block ``i``'s C step from ``natives`` (made, or made again when its projections or
    norms changed), or None where the Python step runs the block."""
    entry = natives.get(i)
    parts = decode_block.projections(block)
    hooked = any(part._forward_hooks or part._forward_pre_hooks for part in parts)
    if (entry is None or entry[0] is not block or entry[1] != tuple(map(id, parts))
            or (entry[2] is None and entry[3] and not hooked)):  # made anew once unhooked
        entry = (block, tuple(map(id, parts)), decode_block.native_block(block, model.config),
                 hooked)  # fmt: skip
        natives[i] = entry
    native = entry[2]
    if native is not None and (hooked or not native.current(parts)):  # hooked, or re-prepared
        native = decode_block.native_block(block, model.config)
        natives[i] = (block, entry[1], native, hooked)
    return native


# The most new tokens a call may bring and still run written out: one in decode, a few where a
# speculative round verifies its draft (gamma + 1); longer inputs are prefills, which the
# model's forward batches better.
MOST_TOKENS = 16

# Keyword arguments the written-out step understands; any other one sends the call to the
# model's own forward.
_KNOWN = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values",
                    "use_cache", "return_dict", "logits_to_keep", "cache_position",
                    "output_attentions", "output_hidden_states", "inputs_embeds", "labels"})


class FastForward:
    """The replacement ``forward``: decode steps through :func:`decode_step`, every other
    call through the class's forward. Holds the model, so ``copy.deepcopy`` of the model
    points the copy's at the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0  # steps it ran itself (tests and benchmarks read it)
        self.__signature__ = inspect.signature(type(model).forward.__get__(model))
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from slimline.speculative import hf

        self.cache_name = hf.cache_name(model)
        self.output = CausalLMOutputWithPast
        self.output_cache = _output_cache_field()
        self.dynamic_layer = _dynamic_layer_class()
        self.c_ops = decode_ops.available()
        self.dynamic = _dynamic_check(self.dynamic_layer)
        self.natives: dict[int, Any] = {}  # each block's C step (decode_step keeps them)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy`` of the model) makes its own block steps: the ones kept
        here point into this model's tensors (and ctypes pointers do not copy)."""
        state = dict(self.__dict__)
        state["natives"] = {}
        return state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self._decode_cache(args, kwargs)
        if cache is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        keep = kwargs.get("logits_to_keep") or 0
        logits = decode_step(self.model, kwargs["input_ids"], cache, self.dynamic_layer,
                             self.c_ops, self.natives if self.c_ops else None, int(keep))
        self.calls += 1
        return self.output(logits=logits, **{self.output_cache: cache})

    def _decode_cache(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The cache when this call is a step :func:`decode_step` runs, else None."""
        if args or not kwargs.keys() <= _KNOWN or torch.is_grad_enabled() or self.model.training:
            return None
        ids = kwargs.get("input_ids")
        # transformers 5.24 renamed past_key_values to cache and still takes the old name
        cache: Any = kwargs.get(self.cache_name or "cache", kwargs.get("past_key_values"))
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1
                or not 1 <= ids.shape[1] <= MOST_TOKENS or not self.dynamic(cache)):
            return None
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return None
        if any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states")):
            return None
        if any(kwargs.get(k) is not None for k in ("inputs_embeds", "labels")):
            return None
        if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):
            return None
        position, count = int(cache.get_seq_length()), ids.shape[1]
        if count > 1 and position == 0:
            return None  # a prefill: the model's forward
        if not _at(kwargs.get("position_ids"), position, count) or not _at(
                kwargs.get("cache_position"), position, count):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.shape != (1, position + count) or not bool(mask.all())):
            return None
        return cache


def _at(positions: Any, position: int, count: int = 1) -> bool:
    """Whether optional ``position_ids`` / ``cache_position`` name exactly ``position`` to
    ``position + count - 1``."""
    if positions is None:
        return True
    if not isinstance(positions, torch.Tensor) or positions.numel() != count:
        return False
    return bool((positions.reshape(-1).cpu() == torch.arange(position, position + count)).all())


def _dynamic_layer_class() -> type | None:
    """transformers 5's ``DynamicLayer`` (a public class of its ``cache_utils``), or None."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    return DynamicLayer


def _dynamic_check(dynamic_layer: type | None) -> Any:
    """A test for a transformers dynamic cache (slimline's quantized one included) whose layers
    return every cached position from ``update`` — not a static, sliding or offloaded one.
    Without transformers' ``DynamicLayer`` class, none passes and the model's forward runs."""
    from transformers import DynamicCache

    from slimline.cache.hf.quantized_cache import QuantizedKVLayer

    if dynamic_layer is None:
        return lambda cache: False
    def dynamic(cache: Any) -> bool:
        if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
            return False
        return all(type(layer) is dynamic_layer or isinstance(layer, QuantizedKVLayer)
                   for layer in cache.layers)

    return dynamic


def _output_cache_field() -> str:
    """The name ``CausalLMOutputWithPast`` gives the cache (``cache`` since transformers 5.24,
    ``past_key_values`` before), read from its fields."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


@register(FastDecodeConfig)
def apply_fast_decode(model: nn.Module, cfg: FastDecodeConfig, ctx: StepContext) -> StepOutcome:
    """Give ``model`` the written-out decode step (idempotent: ``sl.load`` runs it again)."""
    model.forward = FastForward(model)  # type: ignore[method-assign]
    return StepOutcome(modules=[""], notes=[
        "decode steps of one sequence on a dynamic cache (one token, or up to "
        f"{MOST_TOKENS} after a prefill) run the written-out block loop; "
        "every other call runs the model's forward", *float_activation_notes(model)])


def float_activation_notes(model: nn.Module) -> list[str]:
    """The fix, where packed layers decode on exact float32 activations and this CPU has the
    int8-activation kernel, which runs the same layers faster: llama.cpp's arithmetic (x
    rounded to int8 in blocks of 32, integer sums; Q4_0 and Q8_0 dot products). A float32 fused
    multiply-add does 16 products an instruction, a VNNI dot product 64 (BENCHMARKS
    ``decode-*-avx512``: 1.7-1.9x a 4-bit layer at one thread on a Zen 4 EPYC; the AVX2
    tables, ~2x), so float32 activations cannot keep pace with llama.cpp's Q4_0 there
    however the codes are read. A model cast to another dtype decodes on its own path."""
    from slimline.quantize.qlinear import QuantLinear

    embeddings: Any = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
        return []
    layers = [module for module in model.modules()
              if isinstance(module, QuantLinear) and module.decode_activations == "float"
              and not kernels_gemv.a8_unsupported(module.bits, module.in_features, module.group)]
    if not layers or kernels_gemv.library_problem():
        return []
    isa = kernels_gemv._library().isa
    if not isa:
        return []
    return [f"{len(layers)} packed layers decode on exact float32 activations; "
            "`decode_activations: int8` on their quantize step (llama.cpp's arithmetic: x "
            f"rounded to int8 in blocks of 32) decodes faster on this CPU ({isa} kernel)"]
