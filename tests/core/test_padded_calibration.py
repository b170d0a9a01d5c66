"""Calibration on real user text: sequences of different lengths, padded right or left.

The reference is the same sequences fed one at a time, unpadded — what padding must not
change. Checked on the four Hugging Face families (Llama with GQA, GPT-2's Conv1D, OPT, BERT):

* the statistics every calibrated method is built on (Σx², X Xᵀ per layer) agree to 1e-5;
* each calibrated method gives the same compressed model (its state, to float32 rounding of
  the statistics), for right and for left padding, with batches of several sequences;
* ``qat``'s loss on a padded batch is the loss over the real tokens alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.core.batches import forward
from slimline.core.calibration import sequential_layers
from slimline.core.statistics import InputStats
from slimline.core.targets import linear_weight

VOCAB = 96
PAD = 0
FAMILIES = ("llama", "gpt2", "opt", "bert")
# Eight sequences, 3 to 21 tokens: three padded batches of 3, 3 and 2.
LENGTHS = (7, 21, 3, 12, 16, 5, 9, 18)
BATCH = 3


def _build(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        config: Any = tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config).eval()
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(config).eval()
    if family == "opt":
        config = tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD,
        )  # fmt: skip
        return tf.OPTForCausalLM(config).eval()
    config = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, pad_token_id=PAD,
    )  # fmt: skip
    return tf.BertModel(config).eval()


def _sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def one_at_a_time(seqs: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
            for s in seqs]


def padded(seqs: Sequence[torch.Tensor], side: str) -> list[dict[str, torch.Tensor]]:
    """Batches of ``BATCH`` sequences padded with ``PAD`` to their longest, on ``side``."""
    batches = []
    for start in range(0, len(seqs), BATCH):
        chunk = seqs[start : start + BATCH]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), PAD)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, s in enumerate(chunk):
            cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[row, cols], mask[row, cols] = s, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    heads = {"lm_head", "pooler.dense"}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and n not in heads}


def _stats(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, InputStats]:
    layers = _layers(model)
    out: dict[str, InputStats] = {}

    def keep(_group: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
        out.update(stats)

    def make(_name: str, module: nn.Module) -> InputStats:
        return InputStats(linear_weight(module).shape[1], hessian=True)

    sequential_layers(model, layers, batches, make, keep)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_enters_the_layer_statistics(family: str, side: str) -> None:
    model, seqs = _build(family), _sequences()
    want = _stats(model, one_at_a_time(seqs))
    got = _stats(model, padded(seqs, side))
    assert set(got) == set(want) and len(got) >= 8
    for name, ref in want.items():
        assert got[name].tokens == ref.tokens == sum(LENGTHS), name
        assert _rel(got[name].sq_norm, ref.sq_norm) < 1e-5, name
        assert got[name].xxt is not None and ref.xxt is not None
        assert _rel(got[name].xxt, ref.xxt) < 1e-5, name


def test_padded_outputs_of_real_tokens_equal_unpadded() -> None:
    """The premise: left padding with positions counted over real tokens changes no output."""
    for family in ("llama", "gpt2"):
        model, seqs = _build(family), _sequences()
        (batch,) = padded(seqs[:3], "left")
        with torch.no_grad():
            logits = forward(model, batch).logits
            for row, s in enumerate(seqs[:3]):
                alone = forward(model, one_at_a_time([s])[0]).logits[0]
                assert torch.allclose(logits[row, -len(s) :], alone, atol=1e-5), family


ALL = FAMILIES
# method -> (its step, the families it runs on here). Every method runs on every family
# whose blocks it takes, but for variants sharing one statistics path with another row
# (OWL and swiftprune with wanda's norms, the mixed-precision quantizers with rtn's), run on
# fewer to keep the suite fast.
CALIBRATED: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "wanda": ({"method": "wanda", "sparsity": 0.5}, ALL),
    "wanda_owl": ({"method": "wanda", "sparsity": 0.5, "owl": True}, ("llama", "bert")),
    "sparsegpt": ({"method": "sparsegpt", "sparsity": 0.5}, ALL),
    "swiftprune": ({"method": "swiftprune", "sparsity": 0.5}, ("llama", "gpt2")),
    "gptq": ({"method": "gptq", "bits": 4, "group_size": 32}, ALL),
    "awq": ({"method": "awq", "bits": 4, "group_size": 32}, ALL),
    "smoothquant_dynamic": ({"method": "smoothquant", "alpha": None}, ("llama", "opt")),
    "smoothquant_static": ({"method": "smoothquant", "activations": "static"}, ALL),
    "rtn_mixed": ({"method": "rtn", "average_bits": 5.0, "group_size": 32}, ALL),
    "gptq_mixed": ({"method": "gptq", "average_bits": 5.0, "group_size": 32}, ("gpt2",)),
    "hqq_mixed": ({"method": "hqq", "average_bits": 5.0, "group_size": 32}, ("bert",)),
    "structured": ({"method": "structured", "sparsity": 0.25}, ("llama", "bert")),
    "layer_drop": ({"method": "layer_drop", "n_layers": 1}, ALL),
}
# Left padding everywhere (the harder case: positions must be counted over real tokens),
# right padding on Llama.
CASES = [(m, f, "left") for m, (_, fams) in CALIBRATED.items() for f in fams] + [
    (m, "llama", "right") for m, (_, fams) in CALIBRATED.items() if "llama" in fams
]
# Float32 sums in another order, and GEMMs of other shapes, move the statistics by ~1e-7:
# a code at a rounding boundary may flip, and GPTQ carries a flip into the columns after it.
# Bounds: floats to 1e-3 relative (structured's least-squares refit amplifies), at most 2%
# of the integer codes. Padding that entered the statistics breaks both by far (see
# test_the_comparison_catches_padding_in_the_statistics).
FLOAT_TOLERANCE = 1e-3
CODE_TOLERANCE = 0.02


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ beyond float32 rounding of the statistics."""
    assert set(got) == set(want)
    bad = []
    for name, ref in want.items():
        t = got[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            bad.append(name)
        elif t.is_floating_point():
            if _rel(t.float(), ref.float()) > FLOAT_TOLERANCE:
                bad.append(name)
        elif (t != ref).double().mean() > CODE_TOLERANCE:
            bad.append(name)
    return bad


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    return {}


@pytest.mark.parametrize(("method", "family", "side"), CASES)
def test_padded_calibration_gives_the_unpadded_model(
    method: str, family: str, side: str, references: dict[tuple[str, str], Any]
) -> None:
    step, _ = CALIBRATED[method]
    model, seqs = _build(family), _sequences()
    if (method, family) not in references:
        ref = sl.compress(model, {"steps": [step]}, calibration=one_at_a_time(seqs))
        references[(method, family)] = _state(ref.model)
    got = sl.compress(model, {"steps": [step]}, calibration=padded(seqs, side))
    assert _same_state(_state(got.model), references[(method, family)]) == []


@pytest.mark.parametrize("method", ["wanda", "gptq", "smoothquant_static"])
def test_the_comparison_catches_padding_in_the_statistics(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real-token filter switched off, the same comparison fails."""
    from slimline.core.calibration import RealTokens

    step, _ = CALIBRATED[method]
    model, seqs = _build("llama"), _sequences()
    want = _state(sl.compress(model, {"steps": [step]}, calibration=one_at_a_time(seqs)).model)
    monkeypatch.setattr(RealTokens, "keep", lambda self, x: x)
    got = sl.compress(model, {"steps": [step]}, calibration=padded(seqs, "right"))
    assert _same_state(_state(got.model), want) != []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_qat_loss_on_a_padded_batch_is_the_loss_on_its_real_tokens(family: str) -> None:
    from slimline.train.losses import distill_loss

    model, seqs = _build(family), _sequences()[:3]
    (batch,) = padded(seqs, "left")
    with torch.no_grad():
        teacher = forward(model, batch).logits
        student = teacher + 0.1 * torch.randn_like(teacher)
        real = batch["attention_mask"].bool()
        got = distill_loss(student, teacher, True, batch["attention_mask"])
        per_token = [distill_loss(student[i][real[i]][None], teacher[i][real[i]][None], True,
                                  None) for i in range(len(seqs))]  # fmt: skip
    weights = torch.tensor([float(len(s)) for s in seqs])
    want = (torch.stack(per_token) * weights).sum() / weights.sum()
    assert torch.allclose(got, want, rtol=1e-5)
