"""``llama-1b-random``: a Llama with TinyLlama-1.1B's shapes and random weights, for speed only.

At this size a decode step reads about 4.4 GB of float32 weights for 2.2 GFLOP, so batch-1
decode is memory-bound and what a quantized layout saves in bytes shows up in tokens/s. The
weights are random (normal, std 0.02, the Hugging Face initialiser's scale; norms at 1), so
the model says nothing about quality: use it for latency, throughput and memory, never for
perplexity or agreement. Its "data" are random token ids, the same for every split, only to
feed timing and calibration-shaped calls.

Built, not cached: the module is made on the ``meta`` device (no Hugging Face initialisation
pass, which alone takes minutes at 1.1B parameters), then every tensor is filled from its own
seeded generator, several at once. That takes seconds and gives the same weights on
every load with the same torch, so a 4.4 GB cache entry would save little time, cost 4.4 GB
of disk per cache, and take longer to read cold than to draw. Nothing is written to disk.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from slimline.core.batches import Batch
from slimline.models.builtin import Builtin, slice_batches
from slimline.models.cpu import available_cores
from slimline.models.stdlib_files import Split

NAME = "llama-1b-random"
SEED = 0
INIT_STD = 0.02  # LlamaConfig.initializer_range: activations of a realistic scale
PROMPT_LEN = 128  # tokens per random sequence: a decode benchmark's prompt
SEQUENCES = 16  # random sequences per split (``limit`` takes fewer)


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of ``llama-1b-random`` (TinyLlama-1.1B's, arXiv 2401.02385)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 22
    num_heads: int = 32
    num_kv_heads: int = 4  # grouped-query attention: 8 query heads share a key/value head
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = (int, float) if field.name == "rope_theta" else int
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                what = "number" if field.name == "rope_theta" else "integer"
                raise ValueError(f"{NAME}: {field.name} must be a positive {what}, got {value!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{NAME}: hidden_size {self.hidden_size} must split into {self.num_heads} heads, "
                f"and {self.num_heads} heads into {self.num_kv_heads} key/value heads"
            )

    def llama_config(self) -> LlamaConfig:
        """The transformers config (TinyLlama's special tokens: bos 1, eos 2; untied head)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=False,
            initializer_range=INIT_STD,
            bos_token_id=1,
            eos_token_id=2,
        )


SHAPES: dict[Literal["full", "small"], LlamaShape] = {
    "full": LlamaShape(),  # 1.10B parameters, 4.40 GB in float32
    # The same structure in miniature (GQA 4:1, intermediate 2.75x hidden), for tests.
    "small": LlamaShape(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2,
                        num_heads=8, num_kv_heads=2, max_position_embeddings=256),
}  # fmt: skip


def build_llama_random(shape: LlamaShape, seed: int = SEED) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded random weights, in eval mode.

    Matrices and embeddings ~ N(0, 0.02²), each from its own generator seeded by ``seed`` and
    its index in parameter order; norm weights 1. The caller's global RNG is left alone.
    """
    model: LlamaForCausalLM = build_random(LlamaForCausalLM, shape.llama_config(),
                                           LlamaRotaryEmbedding, seed)  # fmt: skip
    return model


def build_random(
    model_class: Any, config: Any, rotary_class: Any, seed: int = SEED
) -> Any:
    """A Hugging Face causal LM of ``model_class`` (Llama layout: ``model.rotary_emb``) built
    as ``llama-1b-random`` is: on the meta device, then every parameter filled (norm weights
    1, everything else N(0, 0.02²) from a generator seeded by ``seed`` and the tensor's index
    in parameter order), the head tied back to the embedding where the config ties them
    (``to_empty`` gives them separate storage), the rotary frequencies computed again."""
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"{type(model).__name__}: the output head is not tied to the "
                               "embedding")
    _fill_random(model, seed)
    _rebuild_rotary(model, config, rotary_class)
    return model.eval()


def _fill_random(model: nn.Module, seed: int) -> None:
    params = list(model.named_parameters())
    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        # normal_ runs on one core and releases the GIL: tensors fill side by side, each from
        # its own generator, so the weights do not depend on the thread count or timing.
        list(pool.map(lambda item: _fill(item[1][1], item[1][0], seed, item[0]),
                      enumerate(params)))  # fmt: skip


@torch.no_grad()  # per thread: the caller's no_grad does not reach the pool's threads
def _fill(tensor: torch.Tensor, name: str, seed: int, index: int) -> None:
    if name.endswith("norm.weight"):
        tensor.fill_(1.0)
        return
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    tensor.normal_(0.0, INIT_STD, generator=generator)


def _rebuild_rotary(model: Any, config: Any, rotary_class: Any) -> None:
    """The rotary frequencies, the model's only buffers, computed again on the CPU.

    ``to_empty`` leaves buffers uninitialised; any other buffer would be a new transformers
    feature this builder does not know how to fill, so it is refused rather than left garbage.
    """
    model.model.rotary_emb = rotary_class(config)
    unknown = [n for n, _ in model.named_buffers() if not n.startswith("model.rotary_emb.")]
    if unknown:
        raise RuntimeError(f"{type(model).__name__}: cannot initialise buffers {unknown} "
                           "built on meta")


def load_llama_random(size: Literal["full", "small"] = "full") -> Builtin:
    """``llama-1b-random`` (or its small test variant), with random token batches."""
    if size not in SHAPES:
        raise ValueError(f"size must be one of {list(SHAPES)}, got {size!r}")
    shape = SHAPES[size]
    model = build_llama_random(shape)

    def make_batches(split: Split, batch_size: int, limit: int | None) -> list[Batch]:
        return slice_batches(random_tokens(shape.vocab_size), batch_size, limit)

    return Builtin(NAME, model, None, "causal-lm", make_batches)


def random_tokens(
    vocab_size: int, sequences: int = SEQUENCES, length: int = PROMPT_LEN, seed: int = SEED
) -> dict[str, torch.Tensor]:
    """``input_ids`` (sequences, length) uniform over the vocabulary, and an all-ones mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (sequences, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
