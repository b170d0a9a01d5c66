"""``code-llama-tiny``: a Llama (GQA, untied head) trained here on the stdlib's own source.

The first load builds it (tokenizer, token streams, training) into the cache; later loads read
safetensors + JSON only. The ``full`` size takes several minutes on two CPU cores; ``small``
builds in seconds and exists for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimline.core.batches import Batch
from slimline.models.builtin import Builtin, slice_batches
from slimline.models.cache import cached_dir
from slimline.models.cpu import available_cores, cpu_bf16_supported, num_threads
from slimline.models.lm_training import TrainSchedule, perplexity, train_causal_lm
from slimline.models.python_corpus import (
    encode_stream,
    read_texts,
    train_bpe_tokenizer,
    windows,
)
from slimline.models.stdlib_files import SPLITS, Split, files_by_split, python_tag, stdlib_files

NAME = "code-llama-tiny"
VERSION = "v1"  # bump when a recipe changes: the cache key includes it, so it rebuilds
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodeLlamaRecipe:
    """Architecture, data budget and training schedule of one size of ``code-llama-tiny``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # a multiple of 128, so group-wise quantizers (group 128) fit
    num_layers: int
    num_heads: int
    num_kv_heads: int  # fewer than num_heads: grouped-query attention, as in Llama 2/3
    schedule: TrainSchedule
    max_chars: dict[Split, int] | None = field(default=None)  # per-split corpus cap; None: all

    def llama_config(self, *, bos: int, eos: int, pad: int) -> LlamaConfig:
        """The transformers config of this recipe."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.schedule.seq_len,
            tie_word_embeddings=False,  # like Llama 2: the head is its own matrix to compress
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )


RECIPES: dict[Literal["full", "small"], CodeLlamaRecipe] = {
    # 5.1M parameters; 1000 steps x 16 x 256 tokens is about 1.8 epochs of the train split.
    # On two idle AMD EPYC (Zen 5) cores with bf16 autocast: 0.46 s/step, ~8 min in all;
    # validation / test perplexity 60 / 41 (a unigram model: ~690 on test).
    "full": CodeLlamaRecipe(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        schedule=TrainSchedule(steps=1000, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=50),
    ),
    # 0.14M parameters on a ~0.4 MB sample of the corpus: about 3 s, for the tests.
    "small": CodeLlamaRecipe(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        schedule=TrainSchedule(
            steps=150, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=10, threads=1
        ),
        max_chars={"train": 300_000, "validation": 40_000, "test": 40_000},
    ),
}


def cache_key(size: Literal["full", "small"]) -> str:
    """The cache directory name of one size: version, size, Python version, recipe digest.

    The digest of the recipe's fields makes any edit of a recipe rebuild even if nobody
    remembered to bump :data:`VERSION` (which covers changes of the code itself).
    """
    fields = json.dumps(asdict(RECIPES[size]), sort_keys=True)
    digest = hashlib.sha256(fields.encode("utf-8")).hexdigest()[:10]
    return f"{NAME}-{VERSION}-{size}-{python_tag()}-{digest}"


def build_code_llama(out: Path, recipe: CodeLlamaRecipe) -> dict[str, object]:
    """Build tokenizer, token streams and trained model into the empty directory ``out``.

    Writes ``tokenizer/``, ``tokens.safetensors``, ``files.json``, ``config.json``,
    ``model.safetensors`` and ``metrics.json`` (the returned build report).
    """
    start = time.perf_counter()
    s = recipe.schedule
    split_files = files_by_split(stdlib_files(), recipe.max_chars)
    texts = {split: read_texts(split_files[split]) for split in SPLITS}
    tokenizer = train_bpe_tokenizer(
        texts["train"], vocab_size=recipe.vocab_size, max_length=s.seq_len
    )
    streams: dict[str, torch.Tensor] = {
        split: encode_stream(tokenizer, texts[split]) for split in SPLITS
    }
    tokenizer.save_pretrained(str(out / "tokenizer"))
    save_file(streams, str(out / "tokens.safetensors"))
    files_json = {split: [f.relpath for f in split_files[split]] for split in SPLITS}
    (out / "files.json").write_text(json.dumps(files_json, indent=1), encoding="utf-8")
    data_seconds = time.perf_counter() - start

    config = recipe.llama_config(
        bos=_token_id(tokenizer, "bos"),
        eos=_token_id(tokenizer, "eos"),
        pad=_token_id(tokenizer, "pad"),
    )
    with torch.random.fork_rng(devices=[]), num_threads(s.threads or available_cores()):
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(config)
        losses = _train_with_progress(model, streams["train"], s)
        ppl = {split: perplexity(model, windows(streams[split], s.seq_len)) for split in SPLITS[1:]}
    config.to_json_file(str(out / "config.json"))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
    )
    report: dict[str, object] = {
        "name": NAME,
        "version": VERSION,
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": {split: int(streams[split].numel()) for split in SPLITS},
        "files": {split: len(files_json[split]) for split in SPLITS},
        "threads": s.threads or available_cores(),
        "bf16_autocast": s.bf16 and cpu_bf16_supported(),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "perplexity": ppl,
        "data_seconds": round(data_seconds, 2),
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    _log.info("built %s: %s", NAME, report)
    return report


def load_code_llama(size: Literal["full", "small"] = "full") -> Builtin:
    """Load (building into the cache on first use) one size of ``code-llama-tiny``."""
    if size not in RECIPES:
        raise ValueError(f"size must be one of {list(RECIPES)}, got {size!r}")
    recipe = RECIPES[size]
    directory = cached_dir(cache_key(size), lambda out: _announce_and_build(out, size, recipe))
    config = LlamaConfig.from_json_file(str(directory / "config.json"))
    with torch.random.fork_rng(devices=[]):  # construction draws random init; keep caller's RNG
        model = LlamaForCausalLM(config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory / "tokenizer"))
    streams = load_file(str(directory / "tokens.safetensors"))
    seq_len = recipe.schedule.seq_len

    def make_batches(split: Split, batch_size: int, limit: int | None) -> list[Batch]:
        ids = windows(streams[split], seq_len)  # (n, T) int64
        return slice_batches(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, batch_size, limit
        )

    return Builtin(NAME, model, tokenizer, "causal-lm", make_batches)


def build_report(size: Literal["full", "small"] = "full") -> dict[str, object]:
    """The ``metrics.json`` of a size (building it first if needed): timings and perplexities."""
    directory = cached_dir(
        cache_key(size), lambda out: _announce_and_build(out, size, RECIPES[size])
    )
    report: dict[str, object] = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    return report


def _announce_and_build(out: Path, size: str, recipe: CodeLlamaRecipe) -> None:
    if size == "full":
        _log.warning("building %s (full) once into the cache; this takes several minutes", NAME)
    build_code_llama(out, recipe)


def _train_with_progress(
    model: LlamaForCausalLM, stream: torch.Tensor, s: TrainSchedule
) -> list[float]:
    from tqdm.auto import tqdm

    with tqdm(total=s.steps, desc=f"training {NAME}", disable=None, leave=False) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            if step % 100 == 0 or step == s.steps - 1:
                _log.info("%s step %d/%d loss %.3f", NAME, step + 1, s.steps, loss)

        return train_causal_lm(model, stream, s, progress=progress)


def _token_id(tokenizer: PreTrainedTokenizerFast, kind: str) -> int:
    value = getattr(tokenizer, f"{kind}_token_id")
    if not isinstance(value, int):
        raise ValueError(f"tokenizer has no {kind} token")
    return value
