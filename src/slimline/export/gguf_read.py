"""A GGUF file slimline wrote, read back as the Hugging Face model llama.cpp runs it as.

The export's parity check (``export/gguf.py``) and the tests rebuild the model from the file
alone: ``gguf``'s own reader and dequantizer give the tensors, the metadata the config (the
transformers class of the family llama.cpp runs it as), and the writer's layout is undone —
the rotary permutation, Gemma's 1 + w gains, GPT-2's Conv1D orientation, Llama 3's divisors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimline.export.gguf_layout import (
    BY_NAME,
    ROPE_FREQS,
    ROPE_LONG,
    ROPE_SHORT,
    Architecture,
    expected_shapes,
    gemma2_query_scalar,
    gguf_name,
    import_gguf,
    rope_heads,
    rope_unpermute,
)


@dataclass
class GgufContents:
    """A GGUF file as Hugging Face pieces: the config its metadata implies (the family llama.cpp
    runs it as), the dequantized state dict (rotary permutation undone), and Llama 3's rotary
    divisors when the file has ``rope_freqs``."""

    architecture: str
    config: Any
    state: dict[str, torch.Tensor]
    rope_divisors: torch.Tensor | None

    def model(self) -> nn.Module:
        """The transformers model these weights make, in eval mode."""
        import transformers

        cls = getattr(transformers, _HF_CLASSES[self.architecture][1])
        # Gemma 2's soft-capped attention runs in transformers' eager attention only.
        eager = {"attn_implementation": "eager"} if BY_NAME[self.architecture].softcap else {}
        rebuilt = cls._from_config(self.config, **eager).eval()
        rebuilt.load_state_dict(self.state, strict=True)
        if self.rope_divisors is not None:
            rotary = rebuilt.model.rotary_emb
            for buffer in ("inv_freq", "original_inv_freq"):
                setattr(rotary, buffer, getattr(rotary, buffer) / self.rope_divisors)
        return rebuilt


# llama.cpp architecture -> (transformers config class, model class) that run the file
_HF_CLASSES = {name: (f"{hf}Config", f"{hf}ForCausalLM") for name, hf in (
    ("llama", "Llama"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("phi3", "Phi3"),
    ("gemma", "Gemma"), ("gemma2", "Gemma2"))} | {"gpt2": ("GPT2Config", "GPT2LMHeadModel")}


def read_gguf(file: str | Path) -> GgufContents:
    """What ``export_gguf`` wrote to ``file``, read back with ``gguf``'s own reader."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(file))
    name = str(reader.fields["general.architecture"].contents())
    if name not in BY_NAME:
        raise ValueError(f"read_gguf: architecture {name!r} is not one slimline writes")

    def field(key: str, default: Any = None) -> Any:
        found = reader.fields.get(f"{name}.{key}")
        return default if found is None else found.contents()

    stored = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in stored
    arch = BY_NAME[name]
    config = _read_config(arch, field, stored, tied)
    state = {}
    for key, shape in expected_shapes(config, arch, tied=tied).items():
        t = stored[gguf_name(key, arch)]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32)).reshape(shape)
        permuted = rope_heads(key, config, arch)
        state[key] = rope_unpermute(w, permuted) if permuted else w
        if arch.norm_offset and key.endswith("norm.weight"):
            state[key] = state[key] - 1.0
        if arch.gpt2 and w.dim() == 2 and ".h." in key:  # Conv1D holds (in, out)
            state[key] = w.t().contiguous()
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight" if arch.gpt2
                                        else "model.embed_tokens.weight"]
    divisors = stored.get(ROPE_FREQS)
    return GgufContents(name, config, state, None if divisors is None else
                        torch.from_numpy(np.array(divisors.data, dtype=np.float32)))


def _read_config(arch: Architecture, field: Any, stored: dict[str, Any], tied: bool) -> Any:
    """The transformers config a file's metadata implies (``field``: its ``<arch>.`` keys)."""
    import transformers

    config_class = getattr(transformers, _HF_CLASSES[arch.name][0])
    if arch.gpt2:
        return config_class(
            vocab_size=int(field("vocab_size")), n_positions=int(field("context_length")),
            n_embd=int(field("embedding_length")), n_layer=int(field("block_count")),
            n_head=int(field("attention.head_count")), n_inner=int(field("feed_forward_length")),
            layer_norm_epsilon=float(field("attention.layer_norm_epsilon")),
            activation_function="gelu_new", tie_word_embeddings=tied)
    heads, kv = int(field("attention.head_count")), int(field("attention.head_count_kv"))
    d = int(field("attention.key_length"))
    extra: dict[str, Any] = {}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(field("rope.freq_base"))}
    if int(field("rope.dimension_count", d)) != d:
        rope["partial_rotary_factor"] = int(field("rope.dimension_count")) / d
    if ROPE_SHORT in stored:  # Phi3Config reads the original context at its top level too
        extra["original_max_position_embeddings"] = \
            int(field("rope.scaling.original_context_length"))
        rope |= {"rope_type": "longrope",
                 "short_factor": np.array(stored[ROPE_SHORT].data, dtype=np.float32).tolist(),
                 "long_factor": np.array(stored[ROPE_LONG].data, dtype=np.float32).tolist(),
                 "original_max_position_embeddings":
                     int(field("rope.scaling.original_context_length")),
                 "attention_factor": float(field("rope.scaling.attn_factor"))}
    if field("rope.scaling.type") == "linear":
        rope |= {"rope_type": "linear", "factor": float(field("rope.scaling.factor"))}
    if arch.softcap:
        layers, hidden = int(field("block_count")), int(field("embedding_length"))
        extra |= {"query_pre_attn_scalar": gemma2_query_scalar(layers, hidden, heads, d),
                 "sliding_window": int(field("attention.sliding_window")),
                 "attn_logit_softcapping": float(field("attn_logit_softcapping")),
                 "final_logit_softcapping": float(field("final_logit_softcapping"))}
    return config_class(
        **extra, vocab_size=int(field("vocab_size")), hidden_size=int(field("embedding_length")),
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=int(field("block_count")), num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=d,
        max_position_embeddings=int(field("context_length")),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope, tie_word_embeddings=tied, pad_token_id=None,
    )
