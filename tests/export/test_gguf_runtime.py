"""A GGUF export run as a torch causal LM (``export/gguf_runtime.py``): where a row's real tokens
are, how llama.cpp's per-row logits are placed in the batch (checked with a stand-in whose
logits are the torch model's own, on padded batches), and the refusals. llama.cpp itself runs
the export in ``test_gguf_llama_cpp.py``."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import slimline as sl
from slimline.export.gguf_runtime import context_for, greedy, real_span, score
from slimline.export.runtime import ExportedModel

pytest.importorskip("gguf")


def test_real_span_finds_one_run_of_ones():
    assert real_span(torch.tensor([1, 1, 1, 0, 0])) == slice(0, 3)
    assert real_span(torch.tensor([0, 0, 1, 1, 1])) == slice(2, 5)
    assert real_span(torch.tensor([0, 0, 0])) == slice(0, 0)
    with pytest.raises(ValueError, match="one run of ones"):
        real_span(torch.tensor([1, 0, 1]))


def test_context_is_a_power_of_two_that_fits():
    assert [context_for(n) for n in (1, 64, 65, 300, 1024)] == [64, 64, 128, 512, 1024]


class TorchLlama:
    """The part of llama-cpp-python's ``Llama`` that ``score`` and ``greedy`` use (reset, eval,
    scores, generate), answered by a torch causal LM: the reference for their placement."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.tokens = model, []
        self.scores = np.zeros((0, 0), dtype=np.float32)

    def reset(self) -> None:
        self.tokens = []

    def eval(self, tokens: list[int]) -> None:
        self.tokens += tokens
        with torch.no_grad():
            self.scores = self.model(torch.tensor([self.tokens])).logits[0].numpy()

    def generate(self, tokens: list[int], **_):
        ids = list(tokens)
        while True:
            with torch.no_grad():
                token = int(self.model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            yield token


def test_score_places_each_rows_logits_at_its_real_tokens(tiny_llama):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    out = score(TorchLlama(tiny_llama), ids, mask, 128)
    for row in range(3):
        real = mask[row].bool()
        with torch.no_grad():
            alone = tiny_llama(ids[row, real][None]).logits[0]
        torch.testing.assert_close(out[row, real], alone)
        assert torch.all(out[row, ~real] == 0)


def test_greedy_matches_transformers_generate(tiny_llama):
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_llama.generate(prompt, max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert greedy(TorchLlama(tiny_llama), prompt[0].tolist(), 8) == want
    assert greedy(TorchLlama(tiny_llama), prompt[0].tolist(), 0) == []


def test_running_without_llama_cpp_names_the_install(tmp_path, tiny_llama, token_batches,
                                                     monkeypatch):
    from tests.export.test_gguf import _tokenizer

    sl.export(tiny_llama, tmp_path / "out", format="gguf", example=token_batches[0],
              dtype="f16", tokenizer=_tokenizer())
    exported = ExportedModel(tmp_path / "out")
    assert exported.can_generate() and exported.vocab == 128
    assert exported.weight_bytes() == (tmp_path / "out" / "model.gguf").stat().st_size
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # for eval to tokenize text
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        exported(**token_batches[0])
    with pytest.raises(ValueError, match="greedy decoding here only"):
        exported.generate(token_batches[0]["input_ids"], max_new_tokens=2, do_sample=True)
