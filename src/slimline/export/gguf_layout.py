"""Where a Hugging Face Llama's weights go in a GGUF file: llama.cpp's tensor names, the
shapes the config implies, and the rotary-embedding row order of the q and k projections.

llama.cpp applies rotary embeddings (RoFormer, arXiv 2104.09864) to adjacent pairs of a head's
dimensions, as the original Llama did (arXiv 2302.13971); Hugging Face's Llama pairs dimension
``j`` with ``j + D/2`` (``rotate_half``). The same rotation on permuted rows gives the same
attention scores: :func:`rope_permute` is the row order llama.cpp's converter writes.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 32  # weights per Q8_0 / Q4_0 block
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """HF module path -> its weight's (out, in) shape under ``config``."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv, d = head_counts(config)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens": (v, h), "model.norm": (h,),
                                          "lm_head": (v, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj": (heads * d, h), f"{p}.self_attn.k_proj": (kv * d, h),
                   f"{p}.self_attn.v_proj": (kv * d, h), f"{p}.self_attn.o_proj": (h, heads * d),
                   f"{p}.mlp.gate_proj": (f, h), f"{p}.mlp.up_proj": (f, h),
                   f"{p}.mlp.down_proj": (h, f), f"{p}.input_layernorm": (h,),
                   f"{p}.post_attention_layernorm": (h,)}
    return shapes


def gguf_name(module: str) -> str:
    """llama.cpp's tensor name for the HF module path ``module`` (its ``.weight``)."""
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if module in fixed:
        return fixed[module] + ".weight"
    parts = module.split(".")  # model.layers.<i>.<self_attn|mlp>.<proj> or .<norm>
    return f"blk.{parts[2]}.{(_ATTN | _MLP | _NORMS)[parts[-1]]}.weight"


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a (heads·D, ...) q/k projection from HF's halves order to llama.cpp's pairs:
    row ``h·D + 2j + s`` of the result is row ``h·D + s·D/2 + j`` of ``w``."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def rope_unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`rope_permute`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def head_counts(config: Any) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dimension) of a Llama ``config``."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, d


def rope_heads(name: str, config: Any) -> int:
    """The head count to permute ``name``'s rows by (q and k projections), else 0."""
    heads, kv, _ = head_counts(config)
    return {"q_proj": heads, "k_proj": kv}.get(name.rsplit(".", 1)[-1], 0)
