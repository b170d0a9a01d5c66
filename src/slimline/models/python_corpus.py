"""The Python-source corpus of ``code-llama-tiny``: its BPE tokenizer and its token streams.

The tokenizer is a byte-level BPE (GPT-2 style pre-tokenisation, so any text round-trips and
there is no unknown token) trained only on the train split. Each split becomes one stream of
token ids (files in path order, each followed by the end-of-text token), cut into fixed-length
windows for training and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from slimline.models.stdlib_files import StdlibFile

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_ENCODE_CHUNK = 64  # files per encode_batch call: bounded memory, still parallel in Rust


def train_bpe_tokenizer(
    texts: Sequence[str], *, vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    ``vocab_size`` counts the 256 byte symbols and the two special tokens. The result has
    ``eos``/``bos`` = ``<|endoftext|>`` and ``pad`` = ``<|pad|>``, so ``save_pretrained`` and
    padding work; ``max_length`` becomes its ``model_max_length``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be at least 258 (bytes + specials), got {vocab_size}")
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )


def read_texts(files: Sequence[StdlibFile]) -> list[str]:
    """The sources of ``files``, in the given order."""
    return [f.read_text() for f in files]


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """One stream (N,) int32 of token ids: every text followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ValueError("tokenizer has no eos token")
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = list(texts[start : start + _ENCODE_CHUNK])
        for enc in backend.encode_batch(chunk, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) int64 cut from a 1-D stream; the tail is dropped."""
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len).long()


def random_windows(
    stream: torch.Tensor, seq_len: int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` windows (count, seq_len) int64 starting at uniformly drawn offsets.

    Random offsets show the model every alignment of the text, unlike a fixed chop.
    """
    if stream.numel() <= seq_len:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for seq_len={seq_len}")
    starts = torch.randint(0, stream.numel() - seq_len, (count,), generator=generator)
    index = starts.unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)  # (count, seq_len)
    return stream[index].long()
