"""compile's attention for encoders (slimline.compile.encoder_attention) against the models'
own sdpa attention: every position, every family it is written for, and each call it leaves
to torch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.compile import encoder_attention
from slimline.compile import varlen_attention as varlen
from tests.compile.test_varlen_attention import calls_of_the_kernel

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(bool(varlen.library_problem()), reason=varlen.library_problem()),
]

VOCAB = 120


def _encoder(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    shape = {"vocab_size": VOCAB, "max_position_embeddings": 64}
    if kind == "distilbert":
        config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **shape)
        return tf.DistilBertModel(config).eval()
    configs = {"bert": (tf.BertConfig, tf.BertModel), "roberta": (tf.RobertaConfig, tf.RobertaModel)}
    config_class, model_class = configs[kind]
    config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, **shape)
    return model_class(config).eval()


def _batch(mask: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, mask.shape, generator=g), "attention_mask": mask}


RIGHT = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
LEFT = RIGHT.flip(1)


def _hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.forward(**batch).last_hidden_state  # the eager forward: no compilation


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right", "left"])
def test_auto_runs_the_kernel_with_the_models_answers(kind: str, mask: torch.Tensor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = _encoder(kind)
    assert model.config._attn_implementation == "sdpa"
    batch = _batch(mask)
    want = _hidden(model, batch)
    result = sl.compress(model, {"steps": [{"method": "compile"}]})
    assert any("attention: slimline" in n for n in result.steps[0].notes)
    assert model.config._attn_implementation == "sdpa"  # the input model is left as it was
    calls = calls_of_the_kernel(monkeypatch)
    got = _hidden(result.model, batch)
    assert len(calls) == 2  # one a layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # padded positions included


def test_compiled_bert_equals_sdpa_over_changing_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _encoder("bert")
    compiled = sl.compress(model, {"steps": [{"method": "compile", "dynamic": True}]}).model
    calls = calls_of_the_kernel(monkeypatch)
    for mask in (RIGHT, RIGHT[:, :6], LEFT):
        batch = _batch(mask)
        with torch.no_grad():
            got = compiled(**batch).last_hidden_state
        torch.testing.assert_close(got, _hidden(model, batch), rtol=1e-5, atol=1e-5)
    assert len(calls) == 6


def test_calls_the_kernel_does_not_take_run_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """No mask, a hole in a row, a row with no token, training with dropout: transformers'
    sdpa function, the model's answer."""
    model = _encoder("bert")
    switched = sl.compress(model, {"steps": [{"method": "compile", "attention": "slimline"}]}
                           ).model  # fmt: skip
    calls = calls_of_the_kernel(monkeypatch)
    ids = _batch(RIGHT)["input_ids"]
    hole = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1, 1]] * 3)
    for batch in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": hole}):
        torch.testing.assert_close(_hidden(switched, batch), _hidden(model, batch),
                                   rtol=1e-5, atol=1e-5)
    assert calls == []
    model.train()
    switched.train()
    direction = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (model, switched):
        torch.manual_seed(5)  # the same dropout masks (eager: inductor draws its own)
        losses.append((m.forward(**_batch(RIGHT)).last_hidden_state * direction).sum())
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0])
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), switched.parameters(),
                                              strict=True) if a.grad is not None]
    assert len(grads) > 10
    for a, b in grads:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert calls == []


def test_auto_leaves_other_models_and_backends_alone() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64)).eval()
    result = sl.compress(llama, {"steps": [{"method": "compile"}]})
    assert result.model.config._attn_implementation == "sdpa"
    assert "model_type 'llama'" in str(encoder_attention.why_not(llama))
    bert = _encoder("bert")
    bert.set_attn_implementation("eager")  # the user's own choice stays
    assert sl.compress(bert, {"steps": [{"method": "compile"}]}
                       ).model.config._attn_implementation == "eager"  # fmt: skip
    with pytest.raises(ValueError, match="compile.attention: 'slimline' cannot run this model.*"
                                         "model_type 'llama'"):
        sl.compress(llama, {"steps": [{"method": "compile", "attention": "slimline"}]})
    with pytest.raises(ValueError, match="compile.attention.*backend onnxruntime"):
        sl.Recipe.from_dict({"steps": [{"method": "compile", "attention": "slimline",
                                        "backend": "onnxruntime"}]})


def test_saved_model_reloads_with_it_and_opens_in_transformers(tmp_path) -> None:
    from transformers import AutoModel

    model = _encoder("bert")
    batch = _batch(RIGHT)
    want = _hidden(model, batch)
    compiled = sl.compress(model, {"steps": [{"method": "compile"}]}).model
    sl.save(compiled, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=_encoder("bert"))
    assert loaded.config._attn_implementation == encoder_attention.NAME
    torch.testing.assert_close(_hidden(loaded, batch), want, rtol=1e-5, atol=1e-5)
    compiled.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert encoder_attention.NAME not in json.dumps(config)
    plain = AutoModel.from_pretrained(tmp_path / "hf")
    assert plain.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_hidden(plain, batch), want, rtol=1e-5, atol=1e-5)


def test_an_export_traces_the_models_own_attention(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from tests.export.test_onnx import _onnx_vs_torch

    model = _encoder("bert")
    compiled = sl.compress(model, {"steps": [{"method": "compile"}]}).model
    sl.export(compiled, tmp_path / "onnx", format="onnx", example=_batch(RIGHT))
    assert _onnx_vs_torch(model, tmp_path / "onnx", _batch(RIGHT[[2, 0, 1]], seed=3)) < 1e-4


def test_the_transformers_model_inside_a_sentence_transformer(tmp_path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:  # fmt: skip
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["code", "runs", "fast", "slow", "model", "layer", "token", "key", "query", "the"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(words, trainers.WordPieceTrainer(
        vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                      pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                      mask_token="[MASK]")  # fmt: skip
    _encoder("bert").save_pretrained(tmp_path / "bert")
    wrapped.save_pretrained(tmp_path / "bert")
    body = st_models.Transformer(str(tmp_path / "bert"))
    st = SentenceTransformer(modules=[body, st_models.Pooling(body.get_word_embedding_dimension())],
                             device="cpu")
    sentences = ["the code runs fast", "token", "the model layer key query runs slow the end"]
    want = st.encode(sentences, convert_to_tensor=True)
    result = sl.compress(st, {"steps": [{"method": "compile", "attention": "slimline"}]})
    inner = result.model[0].auto_model
    assert inner.config._attn_implementation == encoder_attention.NAME
    assert st[0].auto_model.config._attn_implementation == "sdpa"
    calls = calls_of_the_kernel(monkeypatch)
    with torch.no_grad():
        features = result.model.tokenize(sentences)
        got = result.model.forward(features)["sentence_embedding"]  # eager, as compiled runs it
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
