"""``sl.export(format="gguf")`` beyond the plain Llama: Mistral, Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms), Phi-3, Gemma, Gemma 2, GPT-2, a head tied to the embedding, Llama 3's,
linear and LongRoPE scaling, and what is refused. Each file is read back with ``gguf``'s reader and
rebuilt as the model llama.cpp runs; its logits are checked against the original on unseen
tokens (llama.cpp itself runs them in ``test_gguf_llama_cpp.py``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import slimline as sl
from slimline.export.gguf import MODEL_FILE
from slimline.export.gguf_layout import llama3_rope_factors
from slimline.export.gguf_read import read_gguf
from slimline.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT

gguf = pytest.importorskip("gguf")

VOCAB = 320
SHAPES = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def family(kind: str, vocab: int = VOCAB) -> torch.nn.Module:
    """A tiny model of ``kind`` with every weight random (biases and norm gains included, so a
    tensor written to the wrong place or order shows in the logits)."""
    import transformers as tf

    shapes = SHAPES | {"vocab_size": vocab}

    configs = {
        "mistral": lambda: tf.MistralConfig(**shapes, sliding_window=4096),
        "qwen2": lambda: tf.Qwen2Config(**shapes, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**shapes, head_dim=32),
        "qwen3-128": lambda: tf.Qwen3Config(**shapes, head_dim=128),  # Qwen3's own head_dim
        "llama-tied": lambda: tf.LlamaConfig(**shapes, tie_word_embeddings=True),
        "llama3-rope": lambda: tf.LlamaConfig(**shapes, head_dim=32, rope_parameters=LLAMA3_ROPE),
        "linear-rope": lambda: tf.LlamaConfig(**shapes, rope_parameters={
            "rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}),
        "phi3": lambda: tf.Phi3Config(**shapes, sliding_window=64, pad_token_id=0),
        # Phi-4-mini's layout: 3/4 of each head rotated, the head tied to the embedding
        "phi3-partial": lambda: tf.Phi3Config(**shapes, tie_word_embeddings=True, pad_token_id=0,
                                              rope_parameters={"rope_type": "default",
                                                               "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.75}),
        # Phi-3.5's LongRoPE: per-frequency factors, an attention factor for the 4x extension
        # (an original context over llama.cpp's rounded-up n_ctx: both take the short factors)
        "phi3-longrope": lambda: tf.Phi3Config(**shapes | {"max_position_embeddings": 2048},
                                               original_max_position_embeddings=512,
                                               pad_token_id=0, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 512,
            "short_factor": [1.0 + 0.25 * i for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)]}),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2,
                                      n_head=4),
        "gemma": lambda: tf.GemmaConfig(**shapes, head_dim=16, pad_token_id=0),
        # soft-caps low enough to bend these logits; a window the 48 tested tokens pass
        "gemma2": lambda: tf.Gemma2Config(**shapes, head_dim=16, query_pre_attn_scalar=16,
                                          sliding_window=32, attn_logit_softcapping=5.0,
                                          final_logit_softcapping=3.0, pad_token_id=0),
    }
    torch.manual_seed(0)
    eager = {"attn_implementation": "eager"} if kind == "gemma2" else {}  # its soft-capping
    model = tf.AutoModelForCausalLM.from_config(configs[kind](), **eager).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if name.endswith("bias") else 0.15)
    return model


def byte_tokenizer(split: str, vocab: int = 300):
    """A byte-level BPE trained here with the pre-tokenizer of one family: ``gpt-2``,
    ``smollm`` (digits alone, then GPT-2's), ``llama-bpe`` or ``qwen2`` (their regex splits)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in
                                          ("gpt-2", "smollm"))
    first = {"smollm": pre_tokenizers.Digits(individual_digits=True),
             "llama-bpe": pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
             "qwen2": pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated")}.get(split)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level if first is None else pre_tokenizers.Sequence([first,
                                                                                   byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [f"def add_{i}(x, y):\n    return x * {i * 37} + y  # it's {i}\n" for i in range(300)]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _batch(seed: int, length: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (2, length), generator=g),
            "attention_mask": torch.ones(2, length, dtype=torch.long)}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@pytest.mark.parametrize(("kind", "arch", "present", "absent"), [
    ("mistral", "llama", [], ["blk.0.attn_q.bias"]),
    ("qwen2", "qwen2", ["blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"],
     ["output.weight", "blk.0.attn_output.bias"]),
    ("qwen3", "qwen3", ["blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight",
                        "output.weight"], ["blk.0.attn_q.bias"]),
    ("llama-tied", "llama", [], ["output.weight"]),
    ("llama3-rope", "llama", ["rope_freqs.weight"], []),
    ("linear-rope", "llama", [], ["rope_freqs.weight"]),
    ("phi3", "phi3", ["blk.1.attn_qkv.weight", "blk.1.ffn_up.weight", "output.weight"],
     ["blk.1.attn_q.weight", "blk.1.ffn_gate.weight"]),
    ("phi3-partial", "phi3", ["blk.0.attn_qkv.weight"], ["output.weight"]),
    ("phi3-longrope", "phi3", ["rope_factors_long.weight", "rope_factors_short.weight"],
     ["rope_freqs.weight"]),
    ("gpt2", "gpt2", ["position_embd.weight", "blk.1.attn_qkv.bias", "output_norm.bias",
                      "blk.0.ffn_down.bias"], ["output.weight", "blk.0.attn_q.weight"]),
    ("gemma", "gemma", ["blk.1.ffn_norm.weight"], ["output.weight"]),
    ("gemma2", "gemma2", ["blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight",
                          "blk.1.ffn_norm.weight"], ["output.weight"]),
])
def test_each_family_reads_back_to_its_logits(tmp_path, kind, arch, present, absent):
    model = family(kind)
    report = sl.export(model, tmp_path / "out", format="gguf", example=_batch(0), dtype="f32",
                       tokenizer=byte_tokenizer("gpt-2"))
    assert report.passed and report.details["architecture"] == arch
    contents = read_gguf(tmp_path / "out" / MODEL_FILE)
    assert contents.architecture == arch
    if kind == "phi3-longrope":  # the extension (4x) and its attention factor, as written
        ours, theirs = (m.rope_parameters for m in (model.config, contents.config))
        assert theirs["original_max_position_embeddings"] == 512 == \
            ours["original_max_position_embeddings"]
        assert model.model.rotary_emb.attention_scaling == pytest.approx(
            contents.model().model.rotary_emb.attention_scaling) == pytest.approx(
            (1 + math.log(4) / math.log(512)) ** 0.5)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "out" / MODEL_FILE)).tensors}
    assert set(present) <= names and not set(absent) & names
    # The model llama.cpp would run, rebuilt from the file alone, on tokens it was not checked on
    # and past the 16 positions Llama 3's scaling keeps unscaled.
    batch = _batch(1, length=48)
    torch.testing.assert_close(_logits(contents.model(), batch), _logits(model, batch),
                               atol=1e-4, rtol=0)
    stored = json.loads((tmp_path / "out" / "export.json").read_text())["details"]
    assert stored["tied_output"] == (kind in ("qwen2", "llama-tied", "phi3-partial", "gemma",
                                              "gemma2", "gpt2"))
    assert ("sliding_window_not_written" in stored) == (kind in ("mistral", "phi3"))
    assert ("longrope_factors" in stored) == (kind == "phi3-longrope")


@pytest.mark.parametrize(("kind", "split"), [("mistral", "gpt-2"), ("qwen2", "qwen2"),
                                           ("qwen3-128", "qwen2"), ("llama-tied", "llama-bpe")])
def test_transformers_gguf_reader_loads_the_file(tmp_path, kind, split):
    """transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``), a reader
    independent of slimline's, rebuilds the model and tokenizer. (It takes Qwen3's head_dim
    from its default, 128, does not read ``rope_freqs``, and builds Phi-3 with its default
    padding id 32000, past a tiny vocabulary: the other kinds are checked by slimline's reader
    above and by llama.cpp.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = family(kind), byte_tokenizer(split)
    sl.export(model, tmp_path / "out", format="gguf", example=_batch(0), dtype="f32",
              tokenizer=tokenizer)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file=MODEL_FILE,
                                                  dtype=torch.float32).eval()
    batch = _batch(1, length=48)
    torch.testing.assert_close(_logits(theirs, batch), _logits(model, batch), atol=1e-4, rtol=0)
    read = AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file=MODEL_FILE)
    for text in ("def add_7(x, y):\n    return x * 259 + y\n", "I'M here, it's 1234567!!\n\n"):
        assert read(text, add_special_tokens=False)["input_ids"] \
            == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_scaling_is_in_the_file_not_only_the_config(tmp_path):
    """Without the rope factors (or the linear factor) the rebuilt model's logits differ: the
    round trip above checks the scaling itself."""
    for kind in ("llama3-rope", "linear-rope", "phi3-longrope"):
        model = family(kind)
        sl.export(model, tmp_path / kind, format="gguf", example=_batch(0), dtype="f32",
                  tokenizer=byte_tokenizer("gpt-2"))
        contents = read_gguf(tmp_path / kind / MODEL_FILE)
        contents.rope_divisors = None
        contents.config.rope_parameters = {"rope_type": "default",
                                           "rope_theta": contents.config.rope_parameters[
                                               "rope_theta"]}
        batch = _batch(1, length=48)
        assert (_logits(contents.model(), batch) - _logits(model, batch)).abs().max() > 0.05


def test_llama3_factors_give_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in (LLAMA3_ROPE, LLAMA3_ROPE | {"factor": 32.0, "high_freq_factor": 2.0,
                                             "original_max_position_embeddings": 8192,
                                             "rope_theta": 500000.0}):
        config = LlamaConfig(**SHAPES, head_dim=128, rope_parameters=rope)
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        base = rope["rope_theta"] ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
        ours = base / llama3_rope_factors(128, rope["rope_theta"], rope["factor"],
                                          rope["low_freq_factor"], rope["high_freq_factor"],
                                          rope["original_max_position_embeddings"]).double()
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)


def test_qwen2_rtn_codes_and_biases_are_written_exactly(tmp_path):
    model = sl.compress(family("qwen2"), {"steps": [{"method": "rtn", "bits": 4,
                                                      "group_size": 32}]}).model
    report = sl.export(model, tmp_path / "out", format="gguf", example=_batch(0), dtype="q4_0",
                       tokenizer=byte_tokenizer("qwen2"))
    assert report.passed and len(report.details["exact_codes"]) == 14
    state = read_gguf(tmp_path / "out" / MODEL_FILE).state
    layer = model.get_submodule("model.layers.1.self_attn.k_proj")
    assert torch.equal(state["model.layers.1.self_attn.k_proj.weight"],
                       layer.dequantized_weight(torch.float32))
    assert torch.equal(state["model.layers.1.self_attn.k_proj.bias"], layer.bias.float())


def test_family_refusals_write_nothing(tmp_path):
    import transformers as tf

    cases = [
        (tf.Qwen2Config(**SHAPES, use_sliding_window=True), "use_sliding_window=True"),
        (tf.LlamaConfig(**SHAPES, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                   "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 16}),
         "rope scaling default, linear, llama3 and longrope; this model's is 'yarn'"),
        (tf.LlamaConfig(**SHAPES, attention_bias=True), "attention_bias=True"),
        (tf.Qwen3Config(**SHAPES, attention_bias=True), "attention_bias=True"),
        # llama.cpp's gemma reads no output tensor, and only its llama reads rope_freqs
        (tf.GemmaConfig(**SHAPES, head_dim=16, tie_word_embeddings=False, pad_token_id=0),
         "uses the embedding as the output head"),
        (tf.Qwen2Config(**SHAPES, rope_parameters=LLAMA3_ROPE), "for llama models only"),
        (tf.Gemma2Config(**SHAPES, head_dim=16, query_pre_attn_scalar=64, pad_token_id=0),
         "query_pre_attn_scalar=64 \\(gemma2 needs 16\\)"),
    ]
    for config, message in cases:
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        with pytest.raises(ValueError, match=message):
            sl.export(model, tmp_path / "out", format="gguf", example=_batch(0),
                      tokenizer=byte_tokenizer("gpt-2"))
        assert list(tmp_path.iterdir()) == []


def test_a_window_the_file_cannot_hold_bounds_the_parity_check(tmp_path):
    """llama.cpp's phi3 attends past Phi-3's sliding window (the file cannot say it): parity is
    checked on the window's first tokens, where the two agree, and export.json says so."""
    model = family("phi3")  # window 64
    report = sl.export(model, tmp_path / "out", format="gguf", example=_batch(0, length=100),
                       dtype="f32", tokenizer=byte_tokenizer("gpt-2"))
    assert report.passed and report.details["sliding_window_not_written"] == 64
    assert all(p.shape[-1] <= 64 for p in report.parity)
    rebuilt, batch = read_gguf(tmp_path / "out" / MODEL_FILE).model(), _batch(1, length=100)
    inside = {k: v[:, :64] for k, v in batch.items()}
    torch.testing.assert_close(_logits(rebuilt, inside), _logits(model, inside), atol=1e-4,
                               rtol=0)
    assert (_logits(rebuilt, batch) - _logits(model, batch)).abs().max() > 1e-2  # past it


def test_gemma2_query_scale_is_the_one_llama_cpp_takes():
    from slimline.export.gguf_layout import gemma2_query_scalar

    assert gemma2_query_scalar(46, 4608, 32, 128) == 144  # Gemma-2-27B: hidden / heads
    assert gemma2_query_scalar(26, 2304, 8, 256) == 256  # Gemma-2-2B: the head dimension
    assert gemma2_query_scalar(42, 3584, 16, 256) == 256  # Gemma-2-9B


def test_a_tensor_example_is_cut_to_the_window_too():
    from slimline.export.gguf import _within

    ids = torch.arange(20).reshape(2, 10)
    assert torch.equal(_within(ids, 4), ids[:, :4])
    assert torch.equal(_within({"input_ids": ids}, 4)["input_ids"], ids[:, :4])


def test_cli_exports_gpt2_with_lines_longer_than_its_context(tmp_path):
    """A saved GPT-2 whose 64 positions are fewer than a text line's tokens: the lines are cut
    to the model's context (they were cut to 256 tokens, and GPT-2's position table overran),
    and its Conv1D layers, packed by rtn, are written code for code."""
    from slimline.cli import main

    model = sl.compress(family("gpt2"), {"steps": [{"method": "rtn", "bits": 4,
                                                    "group_size": 32}]}).model
    sl.save(model, tmp_path / "saved", tokenizer=byte_tokenizer("gpt-2"))
    (tmp_path / "text.txt").write_text("\n".join(
        " ".join(f"x{i * j}" for j in range(60)) for i in range(1, 5)) + "\n")
    assert main(["export", "--model", str(tmp_path / "saved"), "--format", "gguf", "--dtype",
                 "q4_0", "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out")]) == 0
    stored = json.loads((tmp_path / "out" / "export.json").read_text())
    assert len(stored["details"]["exact_codes"]) == 8 and stored["details"]["re_encoded"] == []
    assert max(p["shape"][-1] for p in stored["parity"]) == 64
    # The export runs text cut to the same 64 positions (it records the model's context).
    from slimline.sources import resolve_model

    exported = resolve_model(str(tmp_path / "out"))
    assert exported.model.context == 64
    batches = exported.data(str(tmp_path / "text.txt"), split="test", batch_size=2, limit=None)
    assert max(b["input_ids"].shape[1] for b in batches) == 64
