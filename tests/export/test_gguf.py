"""``sl.export(format="gguf")``: the file read back with the ``gguf`` package's own reader and
dequantizer, its rope layout checked against llama.cpp's rotation written out by hand, its
blocks against textbook Q8_0/Q4_0, its tokenizer against the Hugging Face tokenizer, and
what is refused before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import slimline as sl
from slimline.export.gguf import MODEL_FILE
from slimline.export.gguf_layout import (
    ARCHITECTURES,
    expected_shapes,
    gguf_name,
    rope_permute,
    rope_unpermute,
)
from slimline.export.gguf_read import read_gguf

gguf = pytest.importorskip("gguf")

RTN = {"method": "rtn", "group_size": 32}


def _tokenizer(vocab: int = 100):
    """A byte-level BPE trained here (fewer tokens than the tiny Llama's 128 rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"])
    text = [f"def add_{i}(x, y):\n    return x * {i * 37} + y\n" for i in range(200)]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def code_llama():
    from slimline.models import load_builtin

    built = load_builtin("code-llama-tiny", size="small")
    return built, built.batches("test", batch_size=2)[0]


def _reader(directory: Path):
    return gguf.GGUFReader(str(directory / MODEL_FILE))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def test_f32_reads_back_to_the_same_logits(tmp_path, tiny_llama, token_batches):
    batch = token_batches[0]
    report = sl.export(tiny_llama, tmp_path / "out", format="gguf", example=batch,
                       dtype="f32", tokenizer=_tokenizer())
    out = tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    assert report.passed and all(p.max_abs_diff <= 1e-5 for p in report.parity)
    stored = json.loads((out / "export.json").read_text())
    assert stored == report.to_dict() and stored["format"] == "gguf"
    assert stored["details"]["dtype"] == "f32" and stored["details"]["vocab"] == 128
    # Independently of the exporter: rebuild from the file, run on an unseen batch.
    contents = read_gguf(out / MODEL_FILE)
    assert contents.architecture == "llama" and contents.rope_divisors is None
    rebuilt = contents.model()
    torch.testing.assert_close(_logits(rebuilt, token_batches[1]),
                               _logits(tiny_llama, token_batches[1]), atol=1e-5, rtol=0)
    names = {t.name for t in _reader(out).tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight",
            "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"} <= names


def _hf_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Hugging Face's rotation: dimension j pairs with j + D/2 (``rotate_half``)."""
    d = x.shape[-1]
    angle = pos[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _ggml_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's normal rope, written as loops: dimensions 2j, 2j+1 rotate together by
    pos · base^(-2j/D)."""
    out = x.clone()
    d = x.shape[-1]
    for t in range(x.shape[0]):
        for j in range(d // 2):
            theta = float(pos[t]) * base ** (-2 * j / d)
            a, b = x[t, 2 * j], x[t, 2 * j + 1]
            out[t, 2 * j] = a * math.cos(theta) - b * math.sin(theta)
            out[t, 2 * j + 1] = a * math.sin(theta) + b * math.cos(theta)
    return out


def test_rope_permutation_gives_hf_attention_scores_under_ggml_rope():
    g = torch.Generator().manual_seed(0)
    heads, d, hidden, base = 2, 8, 12, 10000.0
    wq = torch.randn(heads * d, hidden, generator=g, dtype=torch.float64)
    wk = torch.randn(heads * d, hidden, generator=g, dtype=torch.float64)
    x, pos = torch.randn(5, hidden, generator=g, dtype=torch.float64), torch.arange(5.0)
    assert torch.equal(rope_unpermute(rope_permute(wq, heads), heads), wq)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        q_hf, k_hf = (_hf_rope(x @ w[rows].T, pos, base) for w in (wq, wk))
        q_cpp, k_cpp = (_ggml_rope(x @ rope_permute(w, heads)[rows].T, pos, base)
                        for w in (wq, wk))
        torch.testing.assert_close(q_cpp @ k_cpp.T, q_hf @ k_hf.T, atol=1e-10, rtol=0)


def test_tokenizer_and_metadata_read_back(tmp_path, code_llama):
    built, batch = code_llama
    sl.export(built.model, tmp_path / "out", format="gguf", example=batch, dtype="f16",
              tokenizer=built.tokenizer)
    reader = _reader(tmp_path / "out")

    def field(key: str):
        return reader.fields[key].contents()

    spec = json.loads(built.tokenizer.backend_tokenizer.to_str())
    vocab = built.tokenizer.get_vocab()
    assert field("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.__getitem__)
    assert field("tokenizer.ggml.merges") == [" ".join(m) for m in spec["model"]["merges"]]
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert field("tokenizer.ggml.eos_token_id") == built.tokenizer.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == built.tokenizer.pad_token_id
    types = field("tokenizer.ggml.token_type")
    assert types[built.tokenizer.pad_token_id] == gguf.TokenType.CONTROL and types[100] == 1
    config = built.model.config
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"),
            field("llama.feed_forward_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.context_length")) == (
        config.num_hidden_layers, config.hidden_size, config.intermediate_size,
        config.num_attention_heads, config.num_key_value_heads,
        config.max_position_embeddings)
    assert field("llama.rope.freq_base") == config.rope_parameters["rope_theta"]
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)


def _textbook_q8_0(w: np.ndarray) -> np.ndarray:
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(1, keepdims=True) / 127
    q = np.round(blocks / np.where(d == 0, 1, d))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def _textbook_q4_0(w: np.ndarray) -> np.ndarray:
    blocks = w.reshape(-1, 32).astype(np.float32)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None], 1)
    d = signed_max / -8  # the largest magnitude lands on code 0 (-8 · d)
    q = np.clip(np.floor(blocks / np.where(d == 0, 1, d) + 8.5), 0, 15)
    return ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


@pytest.mark.parametrize("dtype,textbook", [("q8_0", _textbook_q8_0), ("q4_0", _textbook_q4_0)])
def test_blocks_are_textbook_and_parity_is_stored(tmp_path, code_llama, dtype, textbook):
    built, batch = code_llama
    report = sl.export(built.model, tmp_path / "out", format="gguf", example=batch, dtype=dtype,
                       tokenizer=built.tokenizer)
    stored = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report.passed and stored["details"]["dtype"] == dtype
    assert [p["cosine"] for p in stored["parity"]] == [p.cosine for p in report.parity]
    types = {t.name: t.tensor_type.name for t in _reader(tmp_path / "out").tensors}
    assert (types["blk.0.ffn_up.weight"], types["output.weight"], types["output_norm.weight"]) \
        == (dtype.upper(), "Q8_0", "F32")
    state = read_gguf(tmp_path / "out" / MODEL_FILE).state
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj", "lm_head"):
        original = built.model.get_submodule(name).weight.detach().numpy()
        file = state[name + ".weight"].numpy()
        # Under q4_0 the output matrix stays q8_0 (as llama.cpp gives it more bits).
        reference = (_textbook_q8_0 if name == "lm_head" else textbook)(original)
        step = np.abs(original).reshape(-1, 32).max(1).repeat(32).reshape(original.shape) \
            / (127 if dtype == "q8_0" or name == "lm_head" else 8)
        # The same codes but at exact ties (float rounding of x/d may differ in the last bit).
        assert np.mean(file == reference) > 0.999
        assert np.all(np.abs(file - reference) <= step * 1.001 + 1e-12)


@pytest.mark.parametrize("bits,dtype", [(8, "q8_0"), (4, "q4_0")])
def test_quantlinear_codes_are_written_exactly(tmp_path, tiny_llama, token_batches, bits, dtype):
    model = sl.compress(tiny_llama, {"steps": [RTN | {"bits": bits}]}).model
    batch = token_batches[0]
    report = sl.export(model, tmp_path / "out", format="gguf", example=batch, dtype=dtype,
                       tokenizer=_tokenizer())
    names = report.details["exact_codes"]
    assert "model.layers.0.self_attn.q_proj" in names and report.details["re_encoded"] == []
    state = read_gguf(tmp_path / "out" / MODEL_FILE).state
    for name in names:
        assert torch.equal(state[name + ".weight"],
                           model.get_submodule(name).dequantized_weight(torch.float32)), name
    assert report.passed  # the rest of the difference: embedding and output at q8_0


def test_other_quant_grids_are_re_encoded(tmp_path, tiny_llama, token_batches):
    model = sl.compress(tiny_llama, {"steps": [RTN | {"bits": 4, "group_size": 64}]}).model
    report = sl.export(model, tmp_path / "out", format="gguf", example=token_batches[0],
                       dtype="q8_0", tokenizer=_tokenizer())
    assert report.details["exact_codes"] == [] and len(report.details["re_encoded"]) == 14
    assert "14 packed layer(s) re-encoded as q8_0" in report.summary()  # the CLI prints it


def _tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64)).eval()


def test_refusals_write_nothing(tmp_path, tiny_llama, tiny_gpt2, token_batches):
    batch = token_batches[0]
    cases = [
        (_tiny_neox(), {"tokenizer": _tokenizer()}, "this model's type is 'gpt_neox'"),
        (tiny_llama, {}, "needs the model's tokenizer"),
        (tiny_llama, {"tokenizer": _tokenizer(), "dtype": "q5_k"}, "dtype must be one of"),
        (tiny_llama, {"tokenizer": _tokenizer(200)}, "token id"),
    ]
    for model, options, message in cases:
        with pytest.raises(ValueError, match=message):
            sl.export(model, tmp_path / "out", format="gguf", example=batch, **options)
        assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_every_llama_tensor_has_a_distinct_llama_cpp_name(tiny_llama):
    names = [gguf_name(n) for n in expected_shapes(tiny_llama.config, ARCHITECTURES["llama"])]
    assert len(set(names)) == len(names) == 2 + 1 + 9 * 2


def test_cli_exports_a_saved_model_with_its_tokenizer(tmp_path, tiny_llama):
    from slimline.cli import main

    model = sl.compress(tiny_llama, {"steps": [RTN | {"bits": 4}]}).model
    sl.save(model, tmp_path / "saved", tokenizer=_tokenizer())
    (tmp_path / "data.txt").write_text("def add_3(x, y):\n    return x * 111 + y\n" * 4)
    code = main(["export", "--model", str(tmp_path / "saved"), "--format", "gguf", "--dtype",
                 "q4_0", "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "out")])
    stored = json.loads((tmp_path / "out" / "export.json").read_text())
    assert code == 0 and stored["details"]["dtype"] == "q4_0"
    assert len(stored["details"]["exact_codes"]) == 14 and all(p["passed"] for p in stored["parity"])
    tokens = _reader(tmp_path / "out").fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:100] == sorted(_tokenizer().get_vocab(), key=_tokenizer().get_vocab().get)


def test_asymmetric_codes_are_written_as_q4_1(tmp_path, tiny_llama, token_batches):
    """Asymmetric 4-bit groups of 32 are Q4_1's grid: codes as they are, the zero point as the
    block's f16 minimum -scale·zero (rounded: at most 2^-11 of it); q4_0 must re-encode them."""
    model = sl.compress(tiny_llama, {"steps": [RTN | {"bits": 4, "symmetric": False}]}).model
    report = sl.export(model, tmp_path / "out", format="gguf", example=token_batches[0],
                       dtype="q4_1", tokenizer=_tokenizer())
    names = report.details["exact_codes"]
    assert len(names) == 14 and report.details["re_encoded"] == [] and report.passed
    types = {t.name: t.tensor_type.name for t in _reader(tmp_path / "out").tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["output.weight"] == "Q8_0"
    state = read_gguf(tmp_path / "out" / MODEL_FILE).state
    for name in names:
        layer = model.get_submodule(name)
        ours = layer.dequantized_weight(torch.float32)
        offset = (layer.scales.float() * layer.zero_points().float()).repeat_interleave(32, 1)
        assert torch.all((state[name + ".weight"] - ours).abs() <= offset * 2.0 ** -11 + 1e-7)
    # Rounded again onto a grid centred on 8: further from the model (cosine 0.998 here).
    symmetric = sl.compress(tiny_llama, {"steps": [RTN | {"bits": 4}]}).model
    both = sl.export(symmetric, tmp_path / "sym", format="gguf", example=token_batches[0],
                     dtype="q4_1", tokenizer=_tokenizer())  # m = -8·s: exact in f16
    assert len(both.details["exact_codes"]) == 14
    read = read_gguf(tmp_path / "sym" / MODEL_FILE).state
    assert all(torch.equal(read[n + ".weight"], symmetric.get_submodule(n).dequantized_weight(
        torch.float32)) for n in both.details["exact_codes"])
    again = sl.export(model, tmp_path / "q4_0", format="gguf", example=token_batches[0],
                      dtype="q4_0", tokenizer=_tokenizer(), min_cosine=0.99)
    assert again.details["exact_codes"] == [] and len(again.details["re_encoded"]) == 14
