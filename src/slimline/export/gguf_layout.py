"""Where a Hugging Face decoder's weights go in a GGUF file: the llama.cpp architecture each
family is written as, llama.cpp's tensor names, the shapes the config implies, the rotary
embedding's row order and its frequency factors.

llama.cpp's ``llama`` architecture applies rotary embeddings (RoFormer, arXiv 2104.09864) to
adjacent pairs of a head's dimensions, as the original Llama did (arXiv 2302.13971); Hugging
Face's Llama pairs dimension ``j`` with ``j + D/2`` (``rotate_half``). The same rotation on
permuted rows gives the same attention scores: :func:`rope_permute` is the row order llama.cpp's
converter writes. Its ``qwen2`` and ``qwen3`` architectures rotate halves, as Hugging Face does,
so their rows are written as they are, as are ``phi3``'s fused ``[q; k; v]`` and ``[gate; up]``
projections (Phi-3, arXiv 2404.14219), which llama.cpp splits in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

BLOCK = 32  # weights per Q8_0 / Q4_0 block
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "qkv_proj": "attn_qkv"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
        "gate_up_proj": "ffn_up"}  # Phi-3's fused [gate; up]: llama.cpp's phi3 splits it so
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# Gemma 2's four norms: after attention and after the MLP too (its post_attention_layernorm is
# the one after attention, where Llama's is the one before the MLP).
_FOUR_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
ROPE_FREQS = "rope_freqs.weight"
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"


@dataclass(frozen=True)
class Architecture:
    """How a Hugging Face family is written as one of llama.cpp's architectures."""

    name: str  # llama.cpp's ``general.architecture``
    pairs: bool  # rotary on adjacent pairs: q and k rows are permuted from HF's halves
    qkv_bias: bool  # q, k and v projections carry biases (Qwen2, arXiv 2407.10671)
    qk_norm: bool  # per-head RMSNorm of q and k before the rotation (Qwen3, arXiv 2505.09388)
    fused: bool = False  # one qkv_proj and one gate_up_proj per block (Phi-3)
    activation: str = "silu"  # the gated MLP's (Gemma: GELU, tanh approximation)
    # Gemma (arXiv 2403.08295): RMSNorm gains stored as w and applied as 1 + w; llama.cpp's
    # gemma architectures apply the stored gain, so 1 is added when written.
    norm_offset: bool = False
    four_norms: bool = False  # Gemma 2 (arXiv 2408.00118): norms after attention and MLP too
    softcap: bool = False  # Gemma 2: tanh soft-capping of attention and final logits
    gpt2: bool = False  # GPT-2's layout: learned positions, LayerNorms, fused Conv1D c_attn


# HF model_type -> how it is written. Mistral is written as ``llama``, as llama.cpp's converter
# writes it. A sliding window (Mistral's, Phi-3's) is not written: llama.cpp's ``llama`` and
# ``phi3`` attend to the whole context (checked: a ``phi3`` file given one ran as without it),
# which changes nothing up to the window's length; export.json notes it.
ARCHITECTURES = {
    "llama": Architecture("llama", pairs=True, qkv_bias=False, qk_norm=False),
    "mistral": Architecture("llama", pairs=True, qkv_bias=False, qk_norm=False),
    "qwen2": Architecture("qwen2", pairs=False, qkv_bias=True, qk_norm=False),
    "qwen3": Architecture("qwen3", pairs=False, qkv_bias=False, qk_norm=True),
    "phi3": Architecture("phi3", pairs=False, qkv_bias=False, qk_norm=False, fused=True),
    "gpt2": Architecture("gpt2", pairs=False, qkv_bias=True, qk_norm=False, activation="gelu_new",
                         gpt2=True),
    "gemma": Architecture("gemma", pairs=False, qkv_bias=False, qk_norm=False,
                          activation="gelu_pytorch_tanh", norm_offset=True),
    "gemma2": Architecture("gemma2", pairs=False, qkv_bias=False, qk_norm=False,
                           activation="gelu_pytorch_tanh", norm_offset=True, four_norms=True,
                           softcap=True),
}
BY_NAME = {a.name: a for a in ARCHITECTURES.values()}


def expected_shapes(config: Any, arch: Architecture, *, tied: bool = False
                    ) -> dict[str, tuple[int, ...]]:
    """HF state-dict key -> its tensor's shape under ``config``, in writing order; ``tied``:
    the output head is the embedding (no ``lm_head.weight`` is written; llama.cpp falls back
    to ``token_embd``). Linear and Conv1D weights are given as (out, in)."""
    if arch.gpt2:
        return _gpt2_shapes(config, tied)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv, d = head_counts(config)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        if arch.fused:
            shapes |= {f"{a}.qkv_proj.weight": ((heads + 2 * kv) * d, h),
                       f"{a}.o_proj.weight": (h, heads * d)}
        else:
            shapes |= {f"{a}.q_proj.weight": (heads * d, h), f"{a}.k_proj.weight": (kv * d, h),
                       f"{a}.v_proj.weight": (kv * d, h), f"{a}.o_proj.weight": (h, heads * d)}
        if arch.qkv_bias:
            shapes |= {f"{a}.q_proj.bias": (heads * d,), f"{a}.k_proj.bias": (kv * d,),
                       f"{a}.v_proj.bias": (kv * d,)}
        if arch.qk_norm:
            shapes |= {f"{a}.q_norm.weight": (d,), f"{a}.k_norm.weight": (d,)}
        mlp = {f"{m}.gate_up_proj.weight": (2 * f, h)} if arch.fused else \
            {f"{m}.gate_proj.weight": (f, h), f"{m}.up_proj.weight": (f, h)}
        norms = _FOUR_NORMS if arch.four_norms else _NORMS
        shapes |= mlp | {f"{m}.down_proj.weight": (h, f)} \
            | {f"model.layers.{i}.{norm}.weight": (h,) for norm in norms}
    return shapes


def _gpt2_shapes(config: Any, tied: bool) -> dict[str, tuple[int, ...]]:
    h, v = config.hidden_size, config.vocab_size
    f = getattr(config, "n_inner", None) or 4 * h
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, h),
                                          "transformer.wpe.weight": (config.n_positions, h),
                                          "transformer.ln_f.weight": (h,),
                                          "transformer.ln_f.bias": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        b = f"transformer.h.{i}"
        for name, out, inp in (("ln_1", h, 0), ("attn.c_attn", 3 * h, h), ("attn.c_proj", h, h),
                               ("ln_2", h, 0), ("mlp.c_fc", f, h), ("mlp.c_proj", h, f)):
            shapes |= {f"{b}.{name}.weight": (out, inp) if inp else (out,),
                       f"{b}.{name}.bias": (out,)}
    return shapes


_GPT2 = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
         "transformer.ln_f": "output_norm", "lm_head": "output", "ln_1": "attn_norm",
         "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gguf_name(key: str, arch: Architecture = ARCHITECTURES["llama"]) -> str:
    """llama.cpp's tensor name for the HF state-dict key ``key`` under ``arch``."""
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, param = key.rsplit(".", 1)
    if arch.gpt2:
        if module in _GPT2:
            return f"{_GPT2[module]}.{param}"
        parts = module.split(".")  # transformer.h.<i>.<ln_1|attn.c_attn|...>
        return f"blk.{parts[2]}.{_GPT2['.'.join(parts[3:])]}.{param}"
    if module in fixed:
        return f"{fixed[module]}.{param}"
    parts = module.split(".")  # model.layers.<i>.<self_attn|mlp>.<proj> or .<norm>
    norms = _FOUR_NORMS if arch.four_norms else _NORMS
    return f"blk.{parts[2]}.{(_ATTN | _MLP | norms)[parts[-1]]}.{param}"


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
    """(attention heads, key/value heads, head dimension) of a Llama-family ``config``."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, d


def rope_heads(key: str, config: Any, arch: Architecture) -> int:
    """The head count to permute ``key``'s rows by (q and k projections of a pairs
    architecture), else 0."""
    if not arch.pairs:
        return 0
    heads, kv, _ = head_counts(config)
    return {"q_proj": heads, "k_proj": kv}.get(key.rsplit(".", 2)[-2], 0)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> torch.Tensor:
    """Llama 3.1's rotary frequency scaling (arXiv 2407.21783, section 3.3.2 and its reference
    code) as the divisor of each of the ``head_dim / 2`` frequencies, llama.cpp's
    ``rope_freqs`` tensor: wavelengths shorter than ``original_context / high_freq_factor``
    keep their frequency (1), those longer than ``original_context / low_freq_factor`` are
    divided by ``factor``, and those between are interpolated in ``1 / divisor``."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / freqs
    smooth = (original_context / wavelength - low_freq_factor) \
        / (high_freq_factor - low_freq_factor)
    between = 1 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelength < original_context / high_freq_factor, 1.0,
                          torch.where(wavelength > original_context / low_freq_factor, factor,
                                      between))
    return divisor.float()


@dataclass(frozen=True)
class LongRope:
    """LongRoPE's rotary rescaling (Ding et al., arXiv 2402.13753) as Phi-3.5 and Phi-4-mini
    use it: each frequency divided by a per-frequency factor, ``short`` within the original
    context and ``long`` past it, and cos/sin scaled by ``attn_factor``."""

    short: torch.Tensor
    long: torch.Tensor
    original: int  # the context the model was pretrained on
    attn_factor: float


def longrope_of(rope: dict[str, Any], max_positions: int) -> LongRope:
    """The LongRoPE settings of a transformers ``rope_parameters`` dict: the attention factor
    as given, else sqrt(1 + ln(s) / ln(original)) for the extension ``s`` (``factor``, else
    ``max_positions / original``), 1 when nothing is extended."""
    original = int(rope["original_max_position_embeddings"])
    scale = float(rope.get("factor") or max_positions / original)
    attn = rope.get("attention_factor")
    if attn is None:
        attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    return LongRope(torch.tensor(rope["short_factor"], dtype=torch.float32),
                    torch.tensor(rope["long_factor"], dtype=torch.float32), original, float(attn))


def gemma2_query_scalar(layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query scale llama.cpp's gemma2 uses: hidden / heads for a 46-layer model (it takes
    that for Gemma-2-27B), else the head dimension (Gemma 2's 2B and 9B)."""
    return hidden // heads if layers == 46 else head_dim


def import_gguf() -> Any:
    """The ``gguf`` package (an optional extra), or ImportError naming the install."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'slimline[gguf]'") \
            from None
    return gguf
