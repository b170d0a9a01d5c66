"""``sl.export(format="gguf")``'s tokenizers: the byte-level BPE splits llama.cpp knows, named
from ``tokenizer.json``; SentencePiece-style tokenizers written as llama.cpp's ``llama`` one (scores
from the merge order, checked against a textbook merge loop and transformers' GGUF tokenizer);
a saved directory's BOS rule and chat template. llama.cpp tokenizes them in
``test_gguf_llama_cpp.py``."""

from __future__ import annotations

import json

import pytest

import slimline as sl
from slimline.export.gguf import MODEL_FILE
from slimline.export.gguf_vocab import pre_tokenizer
from tests.export.test_gguf_families import _batch, byte_tokenizer, family

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("split", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_named_from_tokenizer_json(tmp_path, split):
    tokenizer = byte_tokenizer(split)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert pre_tokenizer(spec) == split
    model = family("qwen2" if split == "qwen2" else "llama-tied")
    sl.export(model, tmp_path / "out", format="gguf", example=_batch(0), dtype="f32",
              tokenizer=tokenizer)
    fields = gguf.GGUFReader(str(tmp_path / "out" / MODEL_FILE)).fields
    assert fields["tokenizer.ggml.pre"].contents() == split


def test_unknown_pre_tokenizers_and_normalizers_are_refused():
    spec = json.loads(byte_tokenizer("qwen2").backend_tokenizer.to_str())
    other = json.loads(json.dumps(spec))
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    with pytest.raises(ValueError, match="pre-tokenizers llama.cpp knows"):
        pre_tokenizer(other)
    other = json.loads(json.dumps(spec)) | {"normalizer": {"type": "Lowercase"}}
    with pytest.raises(ValueError, match="normalizer 'Lowercase'"):
        pre_tokenizer(other)
    nfc = json.loads(json.dumps(spec)) | {"normalizer": {"type": "NFC"}}
    assert pre_tokenizer(nfc) == "qwen2"  # as Qwen2's tokenizer.json has it


def sentencepiece_tokenizer(style: str = "legacy", vocab: int = 300):
    """A SentencePiece-style BPE as transformers writes Llama 2's (``legacy``: spaces made ``▁``
    by a normalizer), newer files (``metaspace``: by a Metaspace pre-tokenizer) or Gemma's
    (``plain``: no space prepended), trained here;
    its merges are rebuilt as transformers' converter lists them: every split of every token
    into two tokens, in the order of the tokens they make."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    strip = [decoders.Strip(" ", 1, 0)]
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    else:  # "plain", Gemma's: no space prepended
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        strip = []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    text = [f"def add_{i}(x, y):\n    return x * {i * 37} + y  # it's {i}" for i in range(300)]
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab + len(byte_tokens), special_tokens=specials + byte_tokens))
    spec = json.loads(tok.to_str())
    pieces = spec["model"]["vocab"]
    ordered = sorted((t for t in pieces if t not in specials and t not in byte_tokens),
                     key=pieces.get)
    spec["model"]["merges"] = [
        [t[:k], t[k:]] for t in ordered
        for k in sorted(range(1, len(t)), key=lambda k: (pieces.get(t[:k], 0), pieces.get(t[k:], 0)))
        if t[:k] in pieces and t[k:] in pieces]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] in specials]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _spm_merge(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer written out as a textbook loop: spaces made ``▁`` with
    one prepended, characters as the first symbols, then the adjacent pair whose concatenation
    is a token with the highest score merged (leftmost on ties) until none is; a character
    without a token is its UTF-8 bytes' ``<0xXX>`` tokens."""
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in vocab and (best is None or scores[vocab[merged]] > best[0]):
                best = (scores[vocab[merged]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids: list[int] = []
    for s in symbols:
        ids += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()]
    return ids


SPM_TEXTS = ["def add_7(x, y):\n    return x * 259 + y\n", "I'M here, it's 1234567 o'clock!!",
             "two  spaces\tand\ttabs \r\n end", "naïve café — ünïcödé 42°",
             "return add_12(x, y) * 444", "trailing  ", "add_299", "return y * x"]


def test_merge_scores_make_sentencepiece_merging_follow_the_merge_list():
    """With each token scored minus the rank of its first merge, llama.cpp's merging (by score)
    gives the Hugging Face tokenizer's tokens (by merge rank) on every text."""
    from slimline.export.gguf_vocab import merge_scores

    tokenizer = sentencepiece_tokenizer("legacy")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    ranks = merge_scores([" ".join(m) for m in spec["model"]["merges"]])
    scores = [0.0] * len(vocab)
    for token, i in vocab.items():
        scores[i] = ranks.get(token, 0.0)
    for text in SPM_TEXTS:
        assert _spm_merge(text, vocab, scores) == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text
    # The same loop with every score equal (llama.cpp's converter without tokenizer.model)
    # merges leftmost first instead, and splits some texts differently ("add_299").
    flat = [0.0] * len(vocab)
    assert any(_spm_merge(t, vocab, flat) != tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in SPM_TEXTS)


@pytest.mark.parametrize("style", ["legacy", "metaspace", "plain"])
def test_sentencepiece_tokenizer_is_written_as_llamas(tmp_path, style):
    tokenizer = sentencepiece_tokenizer(style)
    report = sl.export(family("llama-tied", 576), tmp_path / "out", format="gguf",
                       example=_batch(0), dtype="f32", tokenizer=tokenizer)
    assert report.details["tokenizer"] == "llama" and report.details["tokenizer_pre"] is None
    assert ("tokenizer_caveat" in report.details) == (style == "metaspace")
    fields = gguf.GGUFReader(str(tmp_path / "out" / MODEL_FILE)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (style != "plain")
    vocab = tokenizer.get_vocab()
    types = fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    assert len(types) == len(scores) == 576
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE
    assert types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL
    merged = vocab[tokenizer.tokenize("def add_7")[0]]  # a token some merge makes
    assert types[merged] == gguf.TokenType.NORMAL and scores[merged] < 0
    assert fields["tokenizer.ggml.unknown_token_id"].contents() == vocab["<unk>"]
    # transformers' GGUF loader rebuilds a tokenizer from the tokens and scores alone.
    from transformers import AutoTokenizer

    read = AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file=MODEL_FILE)
    for text in SPM_TEXTS:
        assert read(text, add_special_tokens=False)["input_ids"] \
            == tokenizer(text, add_special_tokens=False)["input_ids"], text


TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def saved_with_bos_and_template(directory, kind: str = "llama-tied"):
    """A Hugging Face directory as users have them: a tokenizer that puts BOS first and
    carries a chat template, saved beside the model."""
    from tokenizers import processors

    tokenizer = sentencepiece_tokenizer("legacy")
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = TEMPLATE
    family(kind, 576).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_a_saved_directory_exports_its_bos_rule_and_chat_template(tmp_path):
    from slimline.cli import main

    tokenizer = saved_with_bos_and_template(tmp_path / "hf")
    (tmp_path / "text.txt").write_text("def add_3(x, y):\n\n  return x * 111 + y\nx\n")
    assert main(["export", "--model", str(tmp_path / "hf"), "--format", "gguf", "--data",
                 str(tmp_path / "text.txt"), "--out", str(tmp_path / "out")]) == 0
    fields = gguf.GGUFReader(str(tmp_path / "out" / MODEL_FILE)).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == TEMPLATE


def test_a_tokenizer_transformers_cannot_build_is_read_from_tokenizer_json(tmp_path,
                                                                          monkeypatch):
    """When transformers cannot build the saved tokenizer (a class it lacks, remote code), the
    export reads tokenizer.json alone, and the BOS rule from its post-processor template."""
    import transformers

    from slimline.sources import resolve_model

    saved_with_bos_and_template(tmp_path / "hf")
    source = resolve_model(str(tmp_path / "hf"))

    def cannot(*args, **kwargs):
        raise ValueError("tokenizer class NoSuchTokenizerFast does not exist")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", cannot)
    sl.export(source.model, tmp_path / "out", format="gguf", example=_batch(0), dtype="f32")
    fields = gguf.GGUFReader(str(tmp_path / "out" / MODEL_FILE)).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
