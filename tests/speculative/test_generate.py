"""Speculative ``generate`` end to end: greedy output identical to the target's, every mode,
Llama and GPT-2; sampled output distributed as the target's; batches; what is measured."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import chi2
from transformers import LlamaConfig, LlamaForCausalLM

import slimline as sl
from tests.speculative.helpers import greedy, prompts, saved, small_like, speculative

MODES = ["prompt_lookup", "self", "draft"]


def _fields(mode: str, model: torch.nn.Module, tmp_path, draft: torch.nn.Module | None = None):
    if mode == "draft":
        return {"draft": saved(draft if draft is not None else small_like(model), tmp_path / "d")}
    if mode == "self":
        return {"skip_layers": [1]}  # the tiny models have 2 blocks; block 0 always runs
    return {}


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_output_is_the_targets(kind: str, mode: str, tmp_path, request) -> None:
    model = request.getfixturevalue(kind)
    fast = speculative(model, mode=mode, gamma=3, **_fields(mode, model, tmp_path))
    drafted = 0
    for ids in prompts(model.config.vocab_size):
        expected = greedy(model, ids)
        assert torch.equal(greedy(fast, ids), expected), (mode, ids.shape)
        assert fast.speculative_last.fallbacks == 0
        drafted += fast.speculative_last.drafted
    assert drafted > 0


@pytest.mark.parametrize("mode", MODES)
def test_adaptive_gamma_keeps_the_greedy_output(mode: str, tiny_llama, tmp_path) -> None:
    fast = speculative(tiny_llama, mode=mode, gamma=2, adaptive=True, max_gamma=6,
                       **_fields(mode, tiny_llama, tmp_path))
    for ids in prompts(128, seed=3):
        assert torch.equal(greedy(fast, ids, 20), greedy(tiny_llama, ids, 20))


def test_a_draft_equal_to_the_target_is_always_accepted(tiny_llama, tmp_path) -> None:
    fast = speculative(tiny_llama, mode="draft", gamma=4,
                       **_fields("draft", tiny_llama, tmp_path, draft=tiny_llama))
    ids = prompts(128)[1]
    assert torch.equal(greedy(fast, ids, 20), greedy(tiny_llama, ids, 20))
    last = fast.speculative_last
    assert last.acceptance_rate == 1.0 and last.rejected == 0
    assert last.tokens_per_round > 2.0  # up to gamma + 1 = 5 per forward, less at the ends
    torch.manual_seed(0)
    fast.generate(ids, max_new_tokens=20, do_sample=True)  # p = q: min(1, p/q) = 1
    assert fast.speculative_last.acceptance_rate >= 0.99


@pytest.mark.parametrize("mode", MODES)
def test_a_left_padded_batch_gives_each_row_its_own_output(mode: str, tiny_gpt2, tmp_path) -> None:
    fast = speculative(tiny_gpt2, mode=mode, gamma=3, **_fields(mode, tiny_gpt2, tmp_path))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0
    ids[mask == 0] = 0
    got = greedy(fast, ids, attention_mask=mask)
    assert torch.equal(got, greedy(tiny_gpt2, ids, attention_mask=mask))
    for r in range(3):  # each row as it would be alone, unpadded
        row = ids[r][mask[r].bool()].view(1, -1)
        alone = greedy(tiny_gpt2, row)[0, row.shape[1]:]
        assert torch.equal(got[r, 9 : 9 + alone.numel()], alone)


def test_return_dict_gives_the_sequences_and_the_cache_generate_would(tiny_llama) -> None:
    fast = speculative(tiny_llama, gamma=3)
    ids = prompts(128)[2]
    ours = greedy(fast, ids, return_dict_in_generate=True)
    theirs = greedy(tiny_llama, ids, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    name = "cache" if hasattr(theirs, "cache") and theirs.cache is not None else "past_key_values"
    assert getattr(ours, name).get_seq_length() == getattr(theirs, name).get_seq_length()


# ---------------------------------------------------------------- sampling


def _peaked_llama(seed: int, layers: int, hidden: int) -> LlamaForCausalLM:
    """Vocabulary 6 and a sharpened head: distributions far from uniform and far apart, so a
    wrong sampler shows in a few hundred draws."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=6, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _chi_square_ok(counts: torch.Tensor, p: torch.Tensor, delta: float = 1e-4) -> bool:
    """Pearson's test of counts against p at level δ, cells of expected count < 5 pooled."""
    n = float(counts.sum())
    expected = n * p.double()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat <= chi2.isf(delta, int(keep.sum()) - 1)


def test_sampled_tokens_follow_the_targets_distribution(tmp_path) -> None:
    """Sampled tokens after a fixed prompt: the first (sampled by the prefill forward) must
    follow p(·|prompt), the second — drafted, then kept or resampled by the rejection step —
    the exact mixture Σ_a p(a|prompt)·p(·|prompt, a) (computed with 6 forwards), with a draft
    whose own distribution is far from the target's (L1 0.5 here)."""
    target, draft = _peaked_llama(0, 2, 32), _peaked_llama(1, 1, 16)
    fast = speculative(target, mode="draft", gamma=1, draft=saved(draft, tmp_path / "d"))
    ids = torch.tensor([[1, 5, 2, 3]])
    with torch.no_grad():
        first = torch.softmax(target(ids).logits[0, -1].double(), -1)
        nxt = torch.stack([torch.softmax(target(torch.cat([ids, torch.tensor([[a]])], 1))
                                         .logits[0, -1].double(), -1) for a in range(6)])
        q = torch.softmax(draft(ids).logits[0, -1].double(), -1)
    second = first @ nxt
    assert float((first - q).abs().sum()) > 0.4  # the draft alone would fail the test
    torch.manual_seed(0)
    n = 150
    out = torch.cat([fast.generate(ids, max_new_tokens=3, do_sample=True, top_k=None)[:, 4:6]
                     for _ in range(n)])  # fmt: skip
    assert _chi_square_ok(torch.bincount(out[:, 0], minlength=6), first)
    assert _chi_square_ok(torch.bincount(out[:, 1], minlength=6), second)
    assert not _chi_square_ok(torch.bincount(out[:, 0], minlength=6), q)
    stats = fast.speculative_stats
    assert stats.calls == n and 0 < stats.acceptance_rate < 1  # both branches were taken


def test_sampling_uses_the_processors_generate_builds(tiny_llama) -> None:
    """top_k=1 makes sampling greedy: the speculative sampler must apply it to every
    verified position, as generate applies it to every step."""
    fast = speculative(tiny_llama, gamma=4)
    ids = prompts(128)[2]
    torch.manual_seed(1)
    sampled = fast.generate(ids, max_new_tokens=16, do_sample=True, top_k=1)
    assert torch.equal(sampled, greedy(tiny_llama, ids, 16))


def test_greedy_processors_are_applied_at_every_verified_position(tiny_llama) -> None:
    """A repetition penalty and min_new_tokens change greedy picks by prefix: the loop applies
    them (called member by member) position by position, as generate does step by step."""
    fast = speculative(tiny_llama, gamma=4)
    kwargs = {"repetition_penalty": 3.0, "min_new_tokens": 16}
    for ids in prompts(128):
        assert torch.equal(greedy(fast, ids, 16, **kwargs), greedy(tiny_llama, ids, 16, **kwargs))


def test_processors_needing_more_than_the_scores_keep_the_lists_own_call() -> None:
    from transformers import LogitsProcessorList

    from slimline.speculative.generate import _applied_in_order

    class Scaled:
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores * input_ids.shape[1]

    class NeedsMore:
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, extra: int) -> torch.Tensor:
            return scores + extra

    ids, scores = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5)
    plain = LogitsProcessorList([Scaled(), Scaled()])
    assert torch.equal(_applied_in_order(plain)(ids, scores), plain(ids, scores))
    assert _applied_in_order(plain) is not plain
    needs = LogitsProcessorList([Scaled(), NeedsMore()])
    assert _applied_in_order(needs) is needs


# ---------------------------------------------------------------- what is measured


def test_stats_are_recorded_per_call_and_in_total(tiny_gpt2) -> None:
    fast = speculative(tiny_gpt2, gamma=3)
    for ids in prompts(128):
        greedy(fast, ids)
    total, last = fast.speculative_stats, fast.speculative_last
    assert total.calls == 3 and last.calls == 1
    assert total.new_tokens >= last.new_tokens > 0 and total.seconds > 0 and total.tokens_per_s > 0
    assert total.accepted <= total.drafted and total.rounds <= total.new_tokens
    # one prefill a prompt, emitting its first token; then every round emits its accepted
    # drafts plus one token of the target's (less at a stop)
    assert total.prefills == 3 and total.prefill_seconds > 0
    assert total.new_tokens <= total.prefills + total.accepted + total.rounds
    assert json.loads(json.dumps(total.to_dict()))["calls"] == 3
    fast.speculative_stats.reset()
    assert fast.speculative_stats.calls == 0


def test_options_speculation_does_not_cover_run_plain(tiny_llama) -> None:
    fast = speculative(tiny_llama, gamma=3)
    ids = prompts(128)[1]
    with pytest.warns(UserWarning, match="generation mode beam_search"):
        beams = fast.generate(ids, max_new_tokens=8, num_beams=2, do_sample=False)
    assert torch.equal(beams, tiny_llama.generate(ids, max_new_tokens=8, num_beams=2,
                                                  do_sample=False))
    with pytest.warns(UserWarning, match="output_scores"):
        fast.generate(ids, max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    assert fast.speculative_stats.fallbacks == 2 and fast.speculative_stats.calls == 0


def test_transformers_own_speculation_agrees(tiny_llama) -> None:
    """Peers: transformers' prompt lookup and assisted generation give the same greedy
    tokens as ours and as plain generate."""
    ids = prompts(128)[2]
    expected = greedy(tiny_llama, ids, 16)
    assert torch.equal(greedy(speculative(tiny_llama, gamma=4), ids, 16), expected)
    assert torch.equal(greedy(tiny_llama, ids, 16, prompt_lookup_num_tokens=4), expected)
    assistant = small_like(tiny_llama)
    assert torch.equal(greedy(tiny_llama, ids, 16, assistant_model=assistant), expected)


def test_evaluate_still_measures_the_forward(tiny_llama, token_batches) -> None:
    """The step leaves forward alone: evaluate's figures for it equal the model's."""
    fast = speculative(tiny_llama)
    report = sl.evaluate(fast, data=token_batches, metrics=["perplexity"])
    plain = sl.evaluate(tiny_llama, data=token_batches, metrics=["perplexity"])
    assert math.isclose(report["models"]["model"]["perplexity"],
                        plain["models"]["model"]["perplexity"], rel_tol=1e-6)


def _forward_sizes(model: torch.nn.Module) -> list[int]:
    """Records the token count of every forward of ``model`` (batch 1)."""
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: sizes.append(
            int((args[0] if args else kwargs["input_ids"]).shape[-1])), with_kwargs=True)
    return sizes


def test_the_prompt_runs_in_one_forward_as_generates_prefill(tiny_llama) -> None:
    """Round 1 feeds the whole prompt with no draft, as plain generate's prefill does, so
    a kernel that depends on a forward's token count sees the prompt's last token as plain
    generate does."""
    fast = speculative(tiny_llama, gamma=3)
    ids = prompts(128)[2]
    plain_sizes, sizes = _forward_sizes(tiny_llama), _forward_sizes(fast)
    assert torch.equal(greedy(fast, ids), greedy(tiny_llama, ids))
    assert sizes[0] == plain_sizes[0] == ids.shape[1]
    assert fast.speculative_last.drafted > 0  # later rounds did draft


def test_verify_forwards_stay_within_the_decode_kernels_rows(tiny_llama, monkeypatch) -> None:
    """No verify forward holds more tokens than ``decode_rows`` allows (here forced to 3 on a
    long repeated prompt that would give longer drafts); the output is unchanged."""
    from slimline.speculative import decode

    monkeypatch.setattr(decode, "decode_rows", lambda _model: 3)
    fast = speculative(tiny_llama, gamma=8)
    ids = prompts(128)[2].repeat(1, 3)
    sizes = _forward_sizes(fast)
    out = greedy(fast, ids, 20)
    assert max(sizes[1:]) <= 3 and fast.speculative_last.accepted > 0
    monkeypatch.undo()
    assert torch.equal(out, greedy(tiny_llama, ids, 20))


def test_decode_rows_is_the_gemv_limit_for_quantized_models(tiny_llama) -> None:
    import sys

    from slimline.quantize.qlinear import GEMV_MAX_ROWS, decode_rows

    assert decode_rows(tiny_llama) == sys.maxsize
    quantized = sl.compress(tiny_llama, {"steps": [{"method": "rtn", "bits": 4,
                                                     "group_size": 32}]}).model
    assert decode_rows(quantized) == GEMV_MAX_ROWS


def test_int8_decode_activations_are_noted(tiny_llama) -> None:
    recipe = {"steps": [{"method": "rtn", "bits": 4, "group_size": 32,
                         "decode_activations": "int8"}, {"method": "speculative"}]}
    result = sl.compress(tiny_llama, recipe)
    assert "nearly tie" in " ".join(result.steps[-1].notes)
