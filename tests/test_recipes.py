"""The named recipes in ``recipes/``: each parses, says what it buys and how it was measured,
and runs on a BERT-like encoder directory other than the built-in, through the API and the
CLI, at its quality bound against the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimline as sl
from slimline.cli import main
from tests.export.test_onnx import _bert, _tokens

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipe -> the least cosine of pooled embeddings to the original it is named for
BOUNDS = {"encoder-cpu-lossless": 0.999, "encoder-cpu-lossless-openvino": 0.999,
          "encoder-cpu-fast": 0.99}
# A user's text: lines of varied lengths, padded per batch by the CLI.
LINES = ["the cat sat", "a dog ran far away from the old house", "hello",
         "one two three four five six seven eight nine ten eleven", "red blue",
         "we measured what it bought", "quiet", "a longer line of words to pad the others out"]

pytest.importorskip("openvino")


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast

    words = sorted({w for line in LINES for w in line.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    assert len(vocab) <= vocab_size
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return BertTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_every_named_recipe_is_listed_and_documented() -> None:
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(BOUNDS)
    for name in BOUNDS:
        text = (RECIPES / f"{name}.yaml").read_text()
        assert text.startswith(f"# {name}")
        assert "benchmarks/cpu_deploy.py" in text and "Measured" in text
        assert sl.Recipe.from_file(RECIPES / f"{name}.yaml").to_dict()["steps"]


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_named_recipe_runs_on_a_bert_directory(tmp_path: Path, name: str, capsys) -> None:
    torch.manual_seed(0)
    source = tmp_path / "bert"
    bert = _bert()
    bert.save_pretrained(source)
    _tokenizer(bert.config.vocab_size).save_pretrained(source)
    text = tmp_path / "user.txt"
    text.write_text("\n".join(LINES) + "\n")
    from transformers import BertModel

    original = BertModel.from_pretrained(source).eval()
    recipe = sl.Recipe.from_file(RECIPES / f"{name}.yaml")
    calibration = [_tokens(4, 12, seed=s) for s in range(3)] if recipe.needs_calibration else None
    compressed = sl.compress(original, recipe, calibration=calibration).model
    for batch in (_tokens(4, 12), _tokens(1, 5, seed=2)):  # padded batch, one short sentence
        cosine = torch.nn.functional.cosine_similarity(
            _pooled(compressed, batch), _pooled(original, batch), dim=-1)
        assert cosine.min() >= BOUNDS[name], (name, cosine)
    code = main(["compress", "--model", str(source), "--recipe",
                 str(RECIPES / f"{name}.yaml"), "--out", str(tmp_path / "out"),
                 "--calibration", str(text), "--batch-size", "3"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "recipe.json").is_file()
