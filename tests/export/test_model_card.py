"""README.md of a saved checkpoint: recipe, step notes, how to load, the source's card."""

from __future__ import annotations

import json
import re

import slimline as sl
from slimline.export.model_card import BEGIN, END, split_front_matter
from slimline.sources import resolve_model
from tests.conftest import TinyMLP

RTN = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]}
SOURCE_CARD = "---\nlicense: mit\ntags:\n- tiny\n---\n# Tiny llama\n\nTrained on nothing.\n"


def _recipe_block(card: str) -> dict:
    return json.loads(re.search(r"```json\n(.*?)\n```", card, re.S).group(1))


def test_card_has_recipe_notes_version_and_loading(tmp_path, tiny_mlp) -> None:
    result = sl.compress(tiny_mlp, RTN)
    out = sl.save(result.model, tmp_path / "out")
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "recipe.json").read_text())
    assert _recipe_block(card) == manifest["recipe"]
    assert f"slimline {sl.__version__}" in card
    assert 'sl.load("path/to/this/dir", model=TinyMLP(...))' in card  # a user class
    notes = result.steps[0].notes
    assert notes and all(note in card for note in notes)
    assert f"| 1 | `rtn` | {len(result.steps[0].modules)} |" in card
    assert "source model's card" not in card
    # the notes survive a load and a second save
    again = sl.save(sl.load(out, model=TinyMLP()), tmp_path / "again")
    assert all(note in (again / "README.md").read_text() for note in notes)


def test_source_card_kept_below_with_front_matter_on_top(tmp_path, tiny_llama) -> None:
    source = tmp_path / "source"
    tiny_llama.save_pretrained(source)
    (source / "README.md").write_text(SOURCE_CARD)
    out = sl.save(sl.compress(resolve_model(str(source)).model, RTN).model, tmp_path / "out")
    card = (out / "README.md").read_text()
    front, body = split_front_matter(card)
    assert front == split_front_matter(SOURCE_CARD)[0]
    assert body.index(END) < body.index("# Tiny llama\n\nTrained on nothing.")
    assert 'sl.load("path/to/this/dir")' in card and "refuses this directory" in card
    # compressing the compressed checkpoint again replaces slimline's section, keeps the source's
    twice = resolve_model(str(out))
    out2 = sl.save(sl.compress(twice.model, {"steps": [{"method": "half"}]}).model,
                   tmp_path / "out2")
    card2 = (out2 / "README.md").read_text()
    assert card2.count(BEGIN) == 1 and card2.count("Trained on nothing.") == 1
    assert [s["method"] for s in _recipe_block(card2)["steps"]] == ["rtn", "half"]
    assert card2.startswith(split_front_matter(SOURCE_CARD)[0])


def test_uncompressed_card_says_so(tmp_path, tiny_llama) -> None:
    card = (sl.save(tiny_llama, tmp_path / "out") / "README.md").read_text()
    assert "No compression step" in card and "refuses" not in card


def test_eval_figures_go_into_the_card_and_replace_older_ones(tmp_path, tiny_llama) -> None:
    from slimline.export.model_card import EVAL_BEGIN, write_evaluation

    out = sl.save(sl.compress(tiny_llama, {"steps": [{"method": "int8_dynamic"}]}).model,
                  tmp_path / "out")
    write_evaluation(out, "| metric | model |\n| --- | --- |\n| cosine | 0.9 |", "slimline eval A")
    write_evaluation(out, "| metric | model |\n| --- | --- |\n| cosine | 0.8 |", "slimline eval B")
    card = (out / "README.md").read_text()
    assert card.count(EVAL_BEGIN) == 1 and "0.8" in card and "0.9" not in card
    assert card.index(EVAL_BEGIN) < card.index("<!-- slimline:end -->")
    assert "`slimline eval B`" in card
