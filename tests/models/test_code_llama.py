from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimline.core.batches import forward
from slimline.models import Builtin, load_builtin
from slimline.models.cache import CACHE_ENV
from slimline.models.code_llama import RECIPES, cache_key
from slimline.models.stdlib_files import SPLITS, split_of


def test_model_is_a_gqa_llama_with_untied_head(small_llama: Builtin) -> None:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model, cfg = small_llama.model, small_llama.model.config
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(small_llama.tokenizer, PreTrainedTokenizerFast)
    assert small_llama.task == "causal-lm"
    assert not model.training
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_batches_shapes(small_llama: Builtin) -> None:
    seq_len = RECIPES["small"].schedule.seq_len
    batches = small_llama.batches("validation", batch_size=3, limit=2)
    assert [b["input_ids"].shape for b in batches] == [(3, seq_len), (3, seq_len)]  # type: ignore[index]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}  # type: ignore[arg-type]
        assert b["input_ids"].dtype == torch.int64  # type: ignore[index]
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))  # type: ignore[index]
        assert int(b["input_ids"].max()) < small_llama.model.config.vocab_size  # type: ignore[index]
    out = forward(small_llama.model, batches[0])
    assert out.logits.shape == (3, seq_len, small_llama.model.config.vocab_size)


def test_split_by_file_is_disjoint_and_hash_based(small_llama: Builtin, models_cache: Path) -> None:
    files = json.loads((models_cache / cache_key("small") / "files.json").read_text())
    assert set(files) == set(SPLITS)
    seen: set[str] = set()
    for split in SPLITS:
        assert files[split], f"empty {split} split"
        assert seen.isdisjoint(files[split])
        seen.update(files[split])
        assert all(split_of(path) == split for path in files[split])
    dirs = {part for path in seen for part in path.split("/")[:-1]}
    assert dirs.isdisjoint({"test", "tests", "idlelib", "site-packages", "encodings"})


def test_model_learned_something(small_llama: Builtin, models_cache: Path) -> None:
    """Held-out perplexity clearly beats the unigram distribution of the training tokens."""
    streams = load_file(str(models_cache / cache_key("small") / "tokens.safetensors"))
    vocab = small_llama.model.config.vocab_size
    counts = torch.bincount(streams["train"].long(), minlength=vocab).double() + 1.0
    log_p = (counts / counts.sum()).log()
    model_nll = unigram_nll = 0.0
    n = 0
    with torch.no_grad():
        for b in small_llama.batches("test", batch_size=16, limit=4):
            ids = b["input_ids"]  # type: ignore[index]
            logits = small_llama.model(input_ids=ids).logits[:, :-1]  # predicts ids[:, 1:]
            model_nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
            unigram_nll -= float(log_p[ids[:, 1:]].sum())
            n += ids[:, 1:].numel()
    assert model_nll / n < unigram_nll / n - 0.2  # nats per token


def test_config_and_tokenizer_save(small_llama: Builtin, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    small_llama.model.config.to_json_file(str(tmp_path / "config.json"))
    assert LlamaConfig.from_json_file(str(tmp_path / "config.json")).tie_word_embeddings is False
    small_llama.tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "def f(x):\n    return {'a': x ** 2}  # ünïcode\n"
    ids = small_llama.tokenizer(text)["input_ids"]
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.decode(ids) == text
    assert reloaded.pad_token_id is not None and reloaded.eos_token_id is not None


def test_cache_hit_is_fast_and_equal(small_llama: Builtin) -> None:
    start = time.perf_counter()
    again = load_builtin("code-llama-tiny", size="small")
    assert time.perf_counter() - start < 5.0
    assert again.model is not small_llama.model
    for (name, a), (_, b) in zip(
        small_llama.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_build_is_deterministic(
    small_llama: Builtin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    rebuilt = load_builtin("code-llama-tiny", size="small")
    reference = small_llama.model.state_dict()
    for name, tensor in rebuilt.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert rebuilt.tokenizer.get_vocab() == small_llama.tokenizer.get_vocab()
    for split in SPLITS:
        a = rebuilt.batches(split, batch_size=64)
        b = small_llama.batches(split, batch_size=64)
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))  # type: ignore[index]
