from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimline.core.batches import forward, mean_pool
from slimline.models import Builtin
from slimline.models.docstrings import docstring_sentences, is_good_sentence, sentences
from slimline.models.minilm import minilm_dir, sentence_splits
from slimline.models.stdlib_files import SPLITS, StdlibFile


def _embed(builtin: Builtin, texts: list[str]) -> torch.Tensor:
    enc = builtin.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = builtin.model(**enc).last_hidden_state  # (B, T, 384)
    return torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)


def test_is_the_pretrained_minilm(minilm: Builtin) -> None:
    from transformers import BertModel

    assert isinstance(minilm.model, BertModel)
    assert minilm.task == "embedding"
    assert not minilm.model.training
    assert minilm.model.config.hidden_size == 384
    assert minilm.model.config.num_hidden_layers == 6
    assert (minilm_dir() / "model.safetensors").is_file()


def test_paraphrase_closer_than_unrelated(minilm: Builtin) -> None:
    e = _embed(
        minilm,
        [
            "Return the number of items in the list.",
            "Give back how many elements the list contains.",
            "The weather in the mountains was cold and windy.",
        ],
    )
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert paraphrase > 0.6
    assert paraphrase > unrelated + 0.3


def test_batches_shapes(minilm: Builtin) -> None:
    batches = minilm.batches("test", batch_size=8, limit=3)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 8]  # type: ignore[index]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}  # type: ignore[arg-type]
        shape = b["input_ids"].shape  # type: ignore[index]
        assert 2 < shape[1] <= 128
        for key in ("attention_mask", "token_type_ids"):
            assert b[key].shape == shape and b[key].dtype == torch.int64  # type: ignore[index]
        assert int(b["attention_mask"].sum(dim=1).max()) == shape[1]  # type: ignore[index]
    out = forward(minilm.model, batches[0])
    assert out.last_hidden_state.shape[:2] == batches[0]["input_ids"].shape  # type: ignore[index]


def test_sentence_splits_are_disjoint_and_clean(minilm: Builtin) -> None:
    data = sentence_splits("small")
    assert set(data) == set(SPLITS)
    assert all(len(data[s]) >= 50 for s in SPLITS)
    train, val, test = (set(data[s]) for s in SPLITS)
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert all(is_good_sentence(s) for split in SPLITS for s in data[split])


def test_sentence_extraction() -> None:
    doc = (
        "Return the sum of two numbers, ignoring overflow.\n\n"
        "    >>> add(1, 2)\n    3\n\n"
        "Short one. This sentence is long enough to be kept here. See also: sub.\n\n"
        ":param a: first number, which is documented in a field list\n"
    )
    assert sentences(doc) == [
        "Return the sum of two numbers, ignoring overflow.",
        "This sentence is long enough to be kept here.",
    ]
    assert not is_good_sentence("x = f(a, b) + g(c, d) * h(e, f) / 2.")
    assert not is_good_sentence("lowercase start is not a sentence we keep.")


def test_duplicate_sentences_go_to_first_file(tmp_path: Path) -> None:
    text = '"""Shared words that both of these files contain."""\n'
    paths = []
    for name in ("a.py", "b.py"):
        path = tmp_path / name
        path.write_text(text)
        paths.append(path)
    files = [
        StdlibFile("b.py", paths[1], "test"),
        StdlibFile("a.py", paths[0], "train"),
    ]
    assert docstring_sentences(files) == {
        "train": ["Shared words that both of these files contain."],
        "validation": [],
        "test": [],
    }


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"slimline\[minilm\]"):
        minilm_dir()
