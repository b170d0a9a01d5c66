"""The ``kv_cache`` step: generation through the int8 cache, on built-in and HF models."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.cache_utils import DynamicCache

import slimline as sl
from slimline.cache.hf.hooks import cache_argument
from slimline.cache.hf.quantized_cache import QuantizedKVCache, QuantizedKVLayer, cache_nbytes
from slimline.cache.kv_cache import SPEC_ATTR
from slimline.cache.kv_quant import dequantize_kv, quantize_kv
from slimline.models import load_builtin
from tests.conftest import TinyMLP

INT8 = {"steps": [{"method": "kv_cache", "bits": 8}]}
# The installed transformers' name for the cache argument and output field: ``cache`` since
# 5.24, ``past_key_values`` before (5.24 still takes the old name, with a warning).
CACHE = cache_argument(LlamaForCausalLM) or "past_key_values"


def _cache(out: object) -> object:
    """The cache of a forward's or ``generate``'s output, under the installed name."""
    return getattr(out, CACHE)


@functools.cache
def _small():
    return load_builtin("code-llama-tiny", size="small")


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=0, eos_token_id=0)).eval()
    return OPTForCausalLM(OPTConfig(
        vocab_size=100, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64)).eval()


def _greedy(model: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, object]:
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, _cache(out)


def test_greedy_generation_agrees_with_the_float_cache() -> None:
    """32 new tokens for 16 test prompts. Measured on code-llama-tiny@small: every token
    agrees, max |Δlogit| 0.011, mean KL 4e-7 (max 1e-5); int4 measured 0.36 and 1e-4. The
    bounds leave room for one row that drifts (1/16 of the tokens) and ~10x on the logits."""
    built = _small()
    ids = built.batches("test", batch_size=16, limit=1)[0]["input_ids"][:, :16]
    model = sl.compress(built.model, INT8).model
    reference, ref_cache = _greedy(built.model, ids, 32)
    tokens, cache = _greedy(model, ids, 32)
    assert type(ref_cache) is DynamicCache and isinstance(cache, QuantizedKVCache)
    assert float((tokens[:, 16:] == reference[:, 16:]).float().mean()) >= 0.9

    # teacher-forced on the float continuation, one token per step: no drift compounds
    caches = [DynamicCache(config=built.model.config), None]
    with torch.no_grad():
        built.model(reference[:, :16], **{CACHE: caches[0]})
        caches[1] = _cache(model(reference[:, :16]))
        assert isinstance(caches[1], QuantizedKVCache)
        diffs, kls, top1 = [], [], []
        for t in range(16, reference.shape[1]):
            a = built.model(reference[:, t : t + 1], **{CACHE: caches[0]}).logits[:, -1]
            b = model(reference[:, t : t + 1], **{CACHE: caches[1]}).logits[:, -1]
            diffs.append(float((a - b).abs().max()))
            kls.append(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1))
            top1.append(a.argmax(-1) == b.argmax(-1))
    assert max(diffs) <= 0.1
    assert float(torch.cat(kls).mean()) <= 1e-5
    assert float(torch.cat(top1).float().mean()) >= 0.99


def test_decode_reads_the_rounded_past_exactly() -> None:
    """One decode step equals a float cache whose past was rounded by the formula."""
    base = _tiny("llama")
    model = sl.compress(base, INT8).model
    ids = torch.randint(0, 100, (2, 12))
    nxt = torch.randint(0, 100, (2, 1))
    with torch.no_grad():
        prefill = model(ids)
        torch.testing.assert_close(prefill.logits, base(ids).logits, rtol=0, atol=0)  # exact
        got = model(nxt, **{CACHE: _cache(prefill)}).logits
        reference = _cache(base(ids, use_cache=True))
        for layer in reference.layers:
            layer.keys = dequantize_kv(quantize_kv(layer.keys, 8, -1, symmetric=True), 8)
            layer.values = dequantize_kv(quantize_kv(layer.values, 8, -1, symmetric=True), 8)
        expected = base(nxt, **{CACHE: reference}).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_forward_uses_the_quantized_cache_only_where_a_cache_is_built() -> None:
    base = _tiny("llama")
    model = sl.compress(base, INT8).model
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert isinstance(_cache(model(ids)), QuantizedKVCache)  # config.use_cache
        assert isinstance(_cache(model(ids, use_cache=True)), QuantizedKVCache)
        assert _cache(model(ids, use_cache=False)) is None
        mine = DynamicCache(config=base.config)
        assert _cache(model(ids, **{CACHE: mine})) is mine  # the caller's cache
        assert _cache(model(ids, None, None, mine)) is mine  # ... given by position
        _, cache = _greedy(model, ids, 4)
        assert isinstance(cache, QuantizedKVCache)
        _, cache = _greedy(base, ids, 4)
        assert type(cache) is DynamicCache  # the user's model is untouched
    assert SPEC_ATTR not in vars(base) and not base._forward_pre_hooks
    assert "generate" not in vars(base)


def test_generate_keeps_the_cache_the_caller_chose() -> None:
    """A cache object, a ``cache_implementation`` or ``use_cache=False`` is left as asked."""
    model = sl.compress(_tiny("llama"), INT8).model
    ids = torch.randint(3, 100, (1, 6))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "pad_token_id": 0}
    mine = DynamicCache(config=model.config)
    assert _cache(model.generate(ids, **{CACHE: mine}, **kwargs)) is mine
    static = _cache(model.generate(ids, cache_implementation="static", **kwargs))
    assert type(static).__name__ == "StaticCache"
    assert _cache(model.generate(ids, use_cache=False, **kwargs)) is None
    config = transformers.GenerationConfig(cache_implementation="static", max_new_tokens=3,
                                           return_dict_in_generate=True, pad_token_id=0)
    assert type(_cache(model.generate(ids, config))).__name__ == "StaticCache"  # by position
    config.cache_implementation = "dynamic"
    assert type(_cache(model.generate(ids, generation_config=config))) is DynamicCache
    quantized = _cache(model.generate(ids, cache_implementation="dynamic", **kwargs))
    assert isinstance(quantized, QuantizedKVCache)
    assert quantized.get_seq_length() == 6 + 3 - 1  # the last new token is never fed back


class _OldCacheName(LlamaForCausalLM):
    """Llama with its cache argument named ``past_key_values``, as before transformers 5.24."""

    def forward(self, input_ids=None, past_key_values=None, **kwargs):  # type: ignore[override]
        if past_key_values is not None:  # handed on under the installed name
            kwargs[CACHE] = past_key_values
        return super().forward(input_ids, **kwargs)


class _NoCacheName(LlamaForCausalLM):
    """Llama whose forward takes no cache under any name transformers has used."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # type: ignore[override]
        return super().forward(input_ids, attention_mask, **kwargs)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # generate, on 5.24
def test_the_cache_argument_is_read_from_the_forward_signature() -> None:
    """Either name works: a forward taking ``past_key_values`` (transformers < 5.24) gets
    the quantized cache under that name, and generates what the installed name does."""
    base = _tiny("llama")
    old = _OldCacheName(base.config).eval()
    old.load_state_dict(base.state_dict())
    assert cache_argument(_OldCacheName) == "past_key_values"
    assert cache_argument(LlamaForCausalLM) == CACHE
    assert cache_argument(_NoCacheName) is None
    model, old_model = sl.compress(base, INT8).model, sl.compress(old, INT8).model
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        assert isinstance(_cache(old_model(ids)), QuantizedKVCache)
    tokens, cache = _greedy(model, ids, 8)
    old_tokens, old_cache = _greedy(old_model, ids, 8)
    assert isinstance(old_cache, QuantizedKVCache) and torch.equal(old_tokens, tokens)
    torch.testing.assert_close(old_cache.layers[0].full_states(), cache.layers[0].full_states())


def test_a_forward_without_a_cache_argument_is_refused_naming_the_version() -> None:
    """transformers 5.24 renamed the argument; a forward with neither name is refused at
    apply time, naming the installed version, before the model is touched."""
    model = _NoCacheName(_tiny("llama").config).eval()
    version = re.escape(transformers.__version__)
    with pytest.raises(ValueError, match=rf"kv_cache\): _NoCacheName.forward takes no KV cache argument.*`cache`.*5\.24.*`past_key_values`.*transformers {version}"):
        sl.compress(model, INT8, inplace=True)
    assert SPEC_ATTR not in vars(model) and "generate" not in vars(model)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_hugging_face_causal_lms(kind: str) -> None:
    base = _tiny(kind)
    model = sl.compress(base, INT8).model
    ids = torch.randint(3, 100, (2, 12))
    reference, ref_cache = _greedy(base, ids, 24)
    tokens, cache = _greedy(model, ids, 24)
    assert float((tokens == reference).float().mean()) >= 0.9
    assert isinstance(cache, QuantizedKVCache) and cache.quantized_layers == 2
    assert all(layer.stored()["keys_codes"].dtype == torch.int8 for layer in cache.layers)
    # same tokens held; int8 codes plus one float32 scale per token and head (D = 16 or 32)
    d = base.config.hidden_size // base.config.num_attention_heads
    assert cache_nbytes(cache) / cache_nbytes(ref_cache) == pytest.approx((d + 4) / (4 * d))


def test_save_load_keeps_the_quantized_cache(tmp_path) -> None:
    built = _small()
    step = {"method": "kv_cache", "bits": 4, "key_axis": "channel", "residual_length": 8}
    model = sl.compress(built.model, {"steps": [step]}).model
    ids = built.batches("test", batch_size=4, limit=1)[0]["input_ids"][:, :16]
    tokens, _ = _greedy(model, ids, 16)
    sl.save(model, tmp_path / "ck", tokenizer=built.tokenizer)
    loaded = sl.load(tmp_path / "ck")
    assert getattr(loaded, SPEC_ATTR) == getattr(model, SPEC_ATTR)
    again, cache = _greedy(loaded, ids, 16)
    assert isinstance(cache, QuantizedKVCache) and torch.equal(again, tokens)
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedKVLayer)
    codes = layer.stored()["keys_codes"]  # (B, H, groups, 8 tokens, D / 2): two codes a byte
    assert codes.dtype == torch.int8 and codes.shape[-2:] == (8, 8)


@pytest.mark.parametrize("factory", [
    lambda: BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)),
    TinyMLP,
], ids=["bert-encoder", "mlp"])
def test_models_without_a_kv_cache_are_refused_untouched(factory) -> None:
    model = factory().eval()
    with pytest.raises(ValueError, match="kv_cache.*no KV cache"):
        sl.compress(model, INT8, inplace=True)
    assert SPEC_ATTR not in vars(model) and not model._forward_pre_hooks


@pytest.mark.parametrize(("step", "field"), [
    ({"bits": 3}, "kv_cache.bits"),
    ({"bits": "8"}, "kv_cache.bits"),
    ({"residual_length": -1}, "kv_cache.residual_length"),
    ({"key_axis": "head"}, "kv_cache.key_axis"),
    ({"key_axis": "channel"}, "kv_cache.residual_length"),  # groups of 0 tokens
    ({"symmetric": 1}, "kv_cache.symmetric"),
    ({"targets": {"include": ["model.layers.0.*"]}}, "kv_cache.targets"),
])
def test_bad_config_raises_before_touching(step: dict, field: str) -> None:
    model = _tiny("llama")
    with pytest.raises((TypeError, ValueError), match=field):
        sl.compress(model, {"steps": [{"method": "kv_cache", **step}]}, inplace=True)
    assert SPEC_ATTR not in vars(model)


def test_int4_needs_an_even_head_dim() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=60, n_layer=1, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()  # D = 15
    with pytest.raises(ValueError, match="kv_cache.bits.*odd"):
        sl.compress(model, {"steps": [{"method": "kv_cache", "bits": 4}]}, inplace=True)


def test_recipe_order_and_reapplying() -> None:
    with pytest.raises(ValueError, match="rtn.*must come before"):
        sl.Recipe.from_dict({"steps": [{"method": "kv_cache"}, {"method": "rtn"}]})
    with pytest.raises(ValueError, match="second cache"):
        sl.Recipe.from_dict({"steps": [{"method": "kv_cache"}, {"method": "kv_cache"}]})
    sl.Recipe.from_dict({"steps": [{"method": "rtn"}, {"method": "kv_cache"}, {"method": "compile"}]})
    once = sl.compress(_tiny("llama"), INT8).model
    twice = sl.compress(once, {"steps": [{"method": "kv_cache", "bits": 4}]}).model
    assert len(twice._forward_pre_hooks) == 1 and getattr(twice, SPEC_ATTR).bits == 4
    _, cache = _greedy(twice, torch.randint(0, 100, (1, 6)), 3)
    assert cache.layers[0].stored()["keys_codes"].shape[-1] == 16 // 2  # 4-bit codes, D = 16
