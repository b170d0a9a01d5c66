"""A transformers encoder's attention on slimline's C kernel: padded rows, real keys only.

A padded batch of sentences costs every query its full row of keys in torch's attention: the
padded keys are multiplied and then masked away. :func:`attention` is an attention function for
transformers' ``AttentionInterface``: it hands the layer's queries, keys and values, as the
(batch · length, heads · D) rows the projections wrote, to
:func:`slimline.compile.varlen_attention.padded_attention`, which computes each row's queries
over that row's real keys only (the ``unpad`` step's kernel, in the padded layout). The result
is the padded model's, every position included, to float rounding: padded queries see the same
real keys they see under the key-padding mask.

transformers builds each attention implementation's mask through ``AttentionMaskInterface``;
:func:`mask` registered beside the function passes the (batch, length) padding mask through
unexpanded where the model asks for a plain bidirectional mask of its own tokens, and builds
torch's (``sdpa``) mask for any other request. Whatever the kernel does not take (a 4-D or no
mask, causal or cross attention, dropout in training, grouped heads, autograd, an export being
traced, a dtype or head width the kernel refuses) runs transformers' ``sdpa`` function with
that mask, so answers equal the model's ``sdpa`` implementation.

Used by ``compile`` (``attention: auto``, its default, picks it for the encoder families in
:data:`ENCODER_TYPES`, the model itself or the transformers model inside a sentence-transformers
one; ``attention: slimline`` asks for it). Measured in BENCHMARKS
(``recovery-*``, ``cpu-deploy-*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimline.compile import varlen_attention as varlen

NAME = "slimline_padded"

# Bidirectional encoders whose attention modules call transformers' attention interface with
# (batch, heads, length, head) queries of their own tokens (transformers 5.24; the tests run
# BERT, RoBERTa and DistilBERT).
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")

# Arguments an attention call may carry that change its maths; any of them set runs sdpa.
_OTHER_MATHS = ("position_bias", "softcap", "s_aux", "sliding_window", "sinks")


def has_attention_switch(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model whose attention implementation can be set.

    ``config._attn_implementation`` is the property transformers' attention docs read the
    implementation from (5.x; tests/compile/test_compile.py checks it on 5.24); a model
    without it is refused, not guessed at."""
    config = getattr(model, "config", None)
    return (callable(getattr(model, "set_attn_implementation", None))
            and getattr(config, "_attn_implementation", None) is not None)


def why_not(model: nn.Module) -> str | None:
    """Why ``model``'s attention cannot be switched to :func:`attention` (None when it can)."""
    kind = type(model).__name__
    if not has_attention_switch(model):
        return f"{kind} is not a transformers model whose attention implementation can be set"
    config: Any = getattr(model, "config", None)
    if config.model_type not in ENCODER_TYPES:
        return (f"{kind} (model_type {config.model_type!r}) is not one of the encoder families "
                f"this attention is written for: {', '.join(ENCODER_TYPES)}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return f"{kind} is configured as a decoder (causal or cross attention)"
    problem = varlen.library_problem()
    return f"the attention kernel cannot run here: {problem}" if problem else None


def encoders(model: nn.Module) -> list[nn.Module]:
    """``model`` itself when its attention can be switched (:func:`why_not`), else the
    outermost modules inside it whose can (the transformers model a sentence-transformers
    model wraps); empty when there is none."""
    if why_not(model) is None:
        return [model]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer, _ in found)
        if name and not inside and why_not(module) is None:
            found.append((name, module))
    return [module for _, module in found]


def install(model: nn.Module) -> None:
    """Switch ``model``'s attention to :func:`attention` (registering it with transformers
    once). Check :func:`why_not` first."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    model.set_attn_implementation(NAME)  # type: ignore[operator]


def mask(**kwargs: Any) -> torch.Tensor | None:
    """The mask transformers passes to :func:`attention`: the (batch, length) bool padding
    mask itself for a bidirectional mask over a sequence's own tokens (no cache, no offsets,
    no extra mask function), else torch's own ``sdpa`` mask for the request."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function

    padding = kwargs.get("attention_mask")
    plain = (kwargs.get("mask_function") is bidirectional_mask_function
             and isinstance(padding, torch.Tensor) and padding.dim() == 2
             and padding.dtype == torch.bool
             and tuple(padding.shape) == (kwargs.get("batch_size"), kwargs.get("kv_length"))
             and kwargs.get("q_length") == kwargs.get("kv_length")
             and _zero(kwargs.get("q_offset")) and _zero(kwargs.get("kv_offset")))  # fmt: skip
    if plain:
        return padding
    built: torch.Tensor | None = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**kwargs)
    return built


def _zero(offset: Any) -> bool:
    return offset is None or (isinstance(offset, int) and offset == 0)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query``, ``key``, ``value`` (batch, heads,
    length, D); returns (batch, length, heads, D) and no weights. Self-attention of an encoder
    under a (batch, length) padding mask runs the C kernel; every other call runs
    transformers' ``sdpa_attention_forward`` with the equivalent 4-D mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, size = query.shape
    scale = float(scaling) if scaling is not None else size ** -0.5
    if attention_mask is not None and _kernel_call(module, query, key, value, attention_mask,
                                                   dropout, kwargs):

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(batch * length, heads * size)

        q, k, v = rows(query), rows(key), rows(value)
        if not varlen.unsupported(q, k, v, size):
            out = varlen.padded_attention(q, k, v, attention_mask, heads, scale)
            return out.view(batch, length, heads, size), None
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = _expanded(attention_mask, module, kwargs, length, key.shape[2])
    result: tuple[torch.Tensor, None] = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return result


def _kernel_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether this call is self-attention of an encoder under a 2-D padding mask, outside an
    export, that the kernel computes as the model would."""
    if attention_mask.dim() != 2 or dropout:
        return False
    if _causal(module, kwargs) or any(kwargs.get(name) is not None for name in _OTHER_MATHS):
        return False
    if key.shape != query.shape or value.shape != query.shape:
        return False  # cross attention, a cache, grouped heads
    if tuple(attention_mask.shape) != (query.shape[0], query.shape[2]):
        return False
    exporting = (torch.compiler.is_exporting() or torch.jit.is_tracing()
                 or torch.onnx.is_in_onnx_export())  # fmt: skip
    return not exporting


def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if flag is None else flag)


def _expanded(padding: torch.Tensor, module: nn.Module, kwargs: dict[str, Any], queries: int,
              keys: int) -> torch.Tensor:
    """The (batch, 1, queries, keys) bool mask transformers' ``sdpa`` path would get for a
    (batch, keys) padding mask: the padding, and causality where the call is causal (the last
    query at the last key)."""
    keep = (padding != 0)[:, None, None, :]
    if _causal(module, kwargs):
        rows = torch.arange(queries, device=padding.device)[:, None] + (keys - queries)
        keep = keep & (torch.arange(keys, device=padding.device)[None, :] <= rows)
    return keep.expand(-1, 1, queries, -1).contiguous()  # as transformers lays it out
