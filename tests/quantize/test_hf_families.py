"""Every quantizer (and the pruners) on the module structures of real Hugging Face families.

Tiny random models are built locally from ``transformers`` config classes (no download):

* Llama with grouped-query attention (4 query heads, 2 KV heads), SwiGLU MLP, RMSNorm;
* GPT-2, whose layers are ``Conv1D`` (weight stored (in, out)), not ``nn.Linear``;
* BERT, a post-LayerNorm encoder (its output here: the mask-pooled last hidden state);
* OPT, pre-LayerNorm with biases, ReLU MLP, and ``project_in``/``project_out`` Linear layers
  outside the blocks (``word_embed_proj_dim`` ≠ ``hidden_size``).

Widths that are not a multiple of the group size (32) give the smaller-last-group path work
in three families: Llama's ``down_proj`` reads 144 inputs, GPT-2's ``c_attn``, ``attn.c_proj``
and ``c_fc`` read 80, OPT's ``project_in`` 48.

Every model and every compressed variant is built once per module (:class:`Zoo`), and each
test checks one property against an independent computation: the list of Linear/Conv1D
layers, the model rebuilt in float from each layer's dequantized weight, the float model
with AWQ's scales folded by hand, the model reloaded from disk.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline as sl
from slimline.api import CompressResult
from slimline.core.batches import forward, output_tensor
from slimline.quantize import awq as awq_module
from slimline.quantize.awq import fold_groups, fold_scale
from slimline.quantize.fp8 import Fp8Linear
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.w8a8 import Int8DynamicLinear, SmoothQuantLinear

FAMILIES = ("llama", "gpt2", "bert", "opt")
VOCAB = 128
GROUP = 32

# The output head each family's default targets leave alone. BertModel has no LM head; its
# last Linear, the pooler (whose output the pooled-hidden-state answer does not use), is
# what the default selection treats as the head.
HEADS = {"llama": "lm_head", "gpt2": "lm_head", "bert": "pooler.dense", "opt": "lm_head"}

Step = dict[str, Any]
# name -> (recipe step, bits of precision of the stored weight). The error bound of a method
# is 4 × 2^-bits of the model's output norm: four units of its relative rounding. fp8 e4m3 has
# 3 mantissa bits + the implicit one; bfloat16 7 + 1; int8_dynamic rounds weights to 8 bits and
# activations to the layers' ``activation_bits`` (7 on CPUs without VNNI; see
# :func:`_w8a8_bits`).
QUANTIZERS: dict[str, tuple[Step, int]] = {
    "rtn8_channel": ({"method": "rtn", "bits": 8, "group_size": None}, 8),
    "rtn4_g32": ({"method": "rtn", "bits": 4, "group_size": GROUP}, 4),
    "rtn4_channel": ({"method": "rtn", "bits": 4, "group_size": None}, 4),
    "rtn3_g32": ({"method": "rtn", "bits": 3, "group_size": GROUP}, 3),
    "rtn3_g32_asym": ({"method": "rtn", "bits": 3, "group_size": GROUP, "symmetric": False}, 3),
    "gptq3_g32": ({"method": "gptq", "bits": 3, "group_size": GROUP}, 3),
    "awq3_g32": ({"method": "awq", "bits": 3, "group_size": GROUP}, 3),
    "hqq3_g32": ({"method": "hqq", "bits": 3, "group_size": GROUP}, 3),
    "fp8": ({"method": "fp8"}, 4),
    "int8_dynamic": ({"method": "int8_dynamic"}, 8),
    "smoothquant": ({"method": "smoothquant"}, 8),
    "half": ({"method": "half"}, 8),
}
PRUNERS: dict[str, Step] = {
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "swiftprune": {"method": "swiftprune", "sparsity": 0.5},
}
STRUCTURED: Step = {"method": "structured", "sparsity": 0.25}
STRUCTURED_FAMILIES = ("llama", "bert")  # GPT-2 and OPT blocks are refused, by name
PACKED = {"rtn": QuantLinear, "gptq": QuantLinear, "awq": QuantLinear, "hqq": QuantLinear,
          "fp8": Fp8Linear, "int8_dynamic": Int8DynamicLinear, "smoothquant": SmoothQuantLinear}
STEPS: dict[str, Step] = {
    **{k: v[0] for k, v in QUANTIZERS.items()}, **PRUNERS, "structured": STRUCTURED
}


# ---------------------------------------------------------------- models and data


def _build(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )).eval()  # fmt: skip
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=80, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )).eval()  # fmt: skip
    if family == "bert":
        return tf.BertModel(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64,
        )).eval()  # fmt: skip
    return tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=48,
    )).eval()  # fmt: skip


def _batches(seed: int, n: int, rows: int = 4, tokens: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, VOCAB, (rows, tokens), generator=g),
         "attention_mask": torch.ones(rows, tokens, dtype=torch.long)}
        for _ in range(n)
    ]  # fmt: skip


# 1024 calibration tokens cover the 128-token vocabulary many times over: with fewer, GPTQ's
# Hessians describe only the tokens seen and its advantage does not carry to held-out text.
CALIBRATION = _batches(seed=1, n=8)
HELD_OUT = _batches(seed=2, n=2)
# One token: float32 matmuls of a single row take torch's packed int4/int8 CPU kernels.
ONE_TOKEN = [{"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}]


def _is_linear_like(module: nn.Module) -> bool:
    """Independent of slimline's own test: nn.Linear, or transformers' Conv1D class."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _targets(model: nn.Module, family: str) -> list[str]:
    return [n for n, m in model.named_modules() if _is_linear_like(m) and n != HEADS[family]]


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([output_tensor(forward(model, b), b).float().reshape(-1) for b in batches])


def _rel_error(model: nn.Module, ref: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    got, want = _outputs(model, batches), _outputs(ref, batches)
    return float((got - want).norm() / want.norm())


class Zoo:
    """The fp32 models and their compressed variants, each built once."""

    def __init__(self) -> None:
        self._models: dict[str, nn.Module] = {}
        self._results: dict[tuple[str, str], CompressResult] = {}
        self._errors: dict[tuple[str, str], float] = {}
        # AWQ's layers as they were just before quantization: scaled, still float.
        self.awq_float: dict[str, dict[str, nn.Module]] = {}

    def model(self, family: str) -> nn.Module:
        if family not in self._models:
            self._models[family] = _build(family)
        return self._models[family]

    def result(self, family: str, name: str) -> CompressResult:
        key = (family, name)
        if key not in self._results:
            model, recipe = self.model(family), {"steps": [STEPS[name]]}
            if STEPS[name]["method"] == "awq":
                self._results[key] = self._awq(family, model, recipe)
            else:
                self._results[key] = sl.compress(model, recipe, calibration=CALIBRATION)
        return self._results[key]

    def error(self, family: str, name: str) -> float:
        key = (family, name)
        if key not in self._errors:
            self._errors[key] = _rel_error(self.result(family, name).model, self.model(family),
                                           HELD_OUT)
        return self._errors[key]

    def _awq(self, family: str, model: nn.Module, recipe: dict[str, Any]) -> CompressResult:
        """Run awq, keeping a float copy of each layer at the moment it is quantized."""
        quantize = awq_module._quantize_layer
        before: dict[int, nn.Module] = {}

        def recording(module: nn.Module, x: torch.Tensor, cfg: Any) -> nn.Module:
            layer = quantize(module, x, cfg)
            before[id(layer)] = copy.deepcopy(module)
            return layer

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(awq_module, "_quantize_layer", recording)
            result = sl.compress(model, recipe, calibration=CALIBRATION)
        self.awq_float[family] = {
            n: before[id(m)] for n, m in result.model.named_modules() if id(m) in before
        }
        return result


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These layers are tiny: a second intra-op thread buys nothing, and on a busy machine
    its spin-waits make the per-column loops of gptq/awq/hqq an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(family: str, name: str) -> Any:
    return pytest.param(family, name, id=f"{family}-{name}")


QUANT_CASES = [_param(f, q) for f in FAMILIES for q in QUANTIZERS]
WEIGHT_ONLY_CASES = [
    _param(f, q) for f in FAMILIES for q in QUANTIZERS if q not in ("half", "int8_dynamic", "smoothquant")
]
PRUNE_CASES = [_param(f, p) for f in FAMILIES for p in PRUNERS]
ALL_CASES = QUANT_CASES + PRUNE_CASES + [_param(f, "structured") for f in STRUCTURED_FAMILIES]


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_every_linear_but_the_head(zoo: Zoo, family: str) -> None:
    model = zoo.model(family)
    chosen = [n for n, _ in sl.Recipe.from_dict({"steps": [{"method": "rtn"}]}).steps[0]
              .select_modules(model)]
    assert chosen == _targets(model, family)
    kinds = {type(model.get_submodule(n)).__name__ for n in chosen}
    assert kinds == ({"Conv1D"} if family == "gpt2" else {"Linear"})
    blocks = 2 * {"llama": 7, "gpt2": 4, "bert": 6, "opt": 6}[family]
    outside = 2 if family == "opt" else 0  # project_in, project_out
    assert len(chosen) == blocks + outside


@pytest.mark.parametrize(("family", "name"), QUANT_CASES)
def test_every_target_is_quantized(zoo: Zoo, family: str, name: str) -> None:
    model, step = zoo.model(family), STEPS[name]
    result = zoo.result(family, name)
    targets = _targets(model, family)
    if step["method"] == "half":
        for n in targets:
            assert result.model.get_submodule(n).weight.dtype == torch.bfloat16, n
        return
    assert result.steps[0].modules == targets
    cls = PACKED[step["method"]]
    for n in targets:
        layer = result.model.get_submodule(n)
        assert type(layer) is cls, (n, type(layer).__name__)
        stored = model.get_submodule(n).weight.shape  # Conv1D: (in, out)
        out_in = tuple(stored[::-1]) if family == "gpt2" else tuple(stored)
        assert tuple(layer.dequantized_weight().shape) == out_in
        if cls is QuantLinear:
            assert (layer.bits, layer.group_size, layer.symmetric) == (
                step["bits"], step["group_size"], step.get("symmetric", step["method"] != "hqq"))
    left = [n for n, m in result.model.named_modules() if _is_linear_like(m)]
    assert left == [HEADS[family]], "a Linear-like layer was skipped silently"


# ---------------------------------------------------------------- quality


def _w8a8_bits(model: nn.Module, bits: int) -> int:
    """``bits``, or fewer where the model's W8A8 layers round activations more coarsely."""
    widths = [m.activation_bits for m in model.modules() if isinstance(m, Int8DynamicLinear)]
    return min([bits, *widths])


@pytest.mark.parametrize(("family", "name"), QUANT_CASES)
def test_output_error_fits_the_bits(zoo: Zoo, family: str, name: str) -> None:
    bits = _w8a8_bits(zoo.result(family, name).model, QUANTIZERS[name][1])
    error = zoo.error(family, name)
    assert 0.0 < error < 4 * 2.0**-bits, error


@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_bits_cost_more(zoo: Zoo, family: str) -> None:
    errors = [zoo.error(family, n) for n in ("rtn8_channel", "rtn4_g32", "rtn3_g32")]
    assert errors == sorted(errors), errors
    # per-channel scales at 4 bits lose to groups of 32; the asymmetric grid wins at 3 bits
    assert zoo.error(family, "rtn4_g32") < zoo.error(family, "rtn4_channel")
    assert zoo.error(family, "rtn3_g32_asym") < zoo.error(family, "rtn3_g32")


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_and_awq_beat_rtn_at_3_bits(zoo: Zoo, family: str) -> None:
    rtn = zoo.error(family, "rtn3_g32")  # the same grid: symmetric, groups of 32
    assert zoo.error(family, "gptq3_g32") < rtn
    assert zoo.error(family, "awq3_g32") < rtn


def _fake_w8a8(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8DynamicLinear written out from its documented grid: per token, 2^bits - 3 steps
    over [min(x, 0), max(x, 0)] with an integer zero point; the product in float. Also returns
    the most a code rounded the other way at a near tie (float noise) can move each output."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / (2**bits - 3)).clamp(min=1e-12)  # (..., 1)
    zero = torch.round(-lo / scale) + 1
    v = x / scale + zero
    x_hat = (torch.clamp(torch.round(v), 0, 2**bits - 1) - zero) * scale
    tie = ((v - v.floor() - 0.5).abs() < 1e-4).float()  # (..., K)
    return F.linear(x_hat, weight, bias), scale * (tie @ weight.abs().t())


def _dequantized_copy(fp32: nn.Module, compressed: nn.Module) -> nn.Module:
    """A fresh copy of the float model holding what ``compressed`` computes with: its other
    tensors (norms folded by awq, biases) and each layer's dequantized weight."""
    ref = copy.deepcopy(fp32)
    own = ref.state_dict()
    ref.load_state_dict({k: v for k, v in compressed.state_dict().items() if k in own},
                        strict=False)
    for name, layer in compressed.named_modules():
        if isinstance(layer, (QuantLinear, Fp8Linear)):
            target = ref.get_submodule(name)
            weight = layer.dequantized_weight()  # (out, in)
            with torch.no_grad():
                target.weight.copy_(weight.t() if type(target).__name__ == "Conv1D" else weight)
    return ref


def _packed_kernel_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)
            and m.kernel_path(torch.zeros(1, m.in_features)) != "dequant"]


@pytest.mark.parametrize(("family", "name"), WEIGHT_ONLY_CASES)
def test_model_computes_with_the_dequantized_weights(zoo: Zoo, family: str, name: str) -> None:
    compressed = zoo.result(family, name).model
    ref = _dequantized_copy(zoo.model(family), compressed)
    if name in ("rtn4_g32", "rtn8_channel"):  # one row in float32 runs the packed kernels
        assert _packed_kernel_layers(compressed)
    for batches in (HELD_OUT[:1], ONE_TOKEN):
        assert _rel_error(compressed, ref, batches) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_dynamic_layers_match_their_grid(zoo: Zoo, family: str) -> None:
    """Layer by layer, on the inputs the quantized model feeds them. (Model-level, one
    activation code rounded the other way at a near tie moves every later layer's codes, so
    the whole model matches its float reference only to about 1e-3.)"""
    compressed = zoo.result(family, "int8_dynamic").model
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: seen.append((n, args[0], out)))
        for n, m in compressed.named_modules() if isinstance(m, Int8DynamicLinear)
    ]
    try:
        _outputs(compressed, HELD_OUT[:1] + ONE_TOKEN)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2 * len(_targets(zoo.model(family), family))
    for name, x, out in seen:
        layer = compressed.get_submodule(name)
        want, tie_slack = _fake_w8a8(x, layer.dequantized_weight(), layer.bias,
                                     layer.activation_bits)  # fmt: skip
        assert ((out - want).abs() <= tie_slack + 1e-5 * want.abs().max()).all(), name


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize(("family", "name"), ALL_CASES)
def test_save_load_gives_identical_outputs(zoo: Zoo, tmp_path, family: str, name: str) -> None:
    compressed = zoo.result(family, name).model
    sl.save(compressed, tmp_path / "ck")
    assert (tmp_path / "ck" / "config.json").is_file()
    loaded = sl.load(tmp_path / "ck")
    assert type(loaded) is type(compressed)
    kinds = [type(m).__name__ for m in compressed.modules()]
    assert [type(m).__name__ for m in loaded.modules()] == kinds
    for batches in (HELD_OUT[:1], ONE_TOKEN):
        torch.testing.assert_close(_outputs(loaded, batches), _outputs(compressed, batches),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------- awq folding

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
FOLDS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "llama": [("input_layernorm", QKV), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
              ("mlp.up_proj", ("mlp.down_proj",))],
    "gpt2": [("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))],
    # BERT is post-LN: its LayerNorm outputs are also the residual, so only v → output folds.
    "bert": [("attention.self.value", ("attention.output.dense",))],
    "opt": [("self_attn_layer_norm", QKV), ("final_layer_norm", ("fc1",)),
            ("self_attn.v_proj", ("self_attn.out_proj",)), ("fc1", ("fc2",))],
}  # fmt: skip


BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "encoder.layer",
          "opt": "model.decoder.layers"}


def _in_features(layer: nn.Module) -> int:
    """Inputs of a Linear (weight (out, in)) or a Conv1D (weight (in, out))."""
    return int(layer.weight.shape[0 if type(layer).__name__ == "Conv1D" else 1])


def _scaled_inputs(layer: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The layer's stored weight with input channel i multiplied by s[i], in its own layout:
    nn.Linear (out, in) scales columns, Conv1D (in, out) rows."""
    w = layer.weight.detach()
    return w * s[:, None] if type(layer).__name__ == "Conv1D" else w * s[None, :]


def _scaled_outputs(prev: nn.Module, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """``prev``'s weight and bias (a norm's, or a Linear's) with output j divided by s[j]."""
    out = {}
    for key in ("weight", "bias"):
        t = getattr(prev, key, None)
        if t is not None:
            out[key] = t.detach() / (s if t.dim() == 1 else s[:, None])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_folds_exactly_where_the_structure_allows(zoo: Zoo, family: str) -> None:
    model = copy.deepcopy(zoo.model(family))
    blocks = model.get_submodule(BLOCKS[family])
    assert isinstance(blocks, nn.ModuleList)
    rules, skipped = fold_groups(blocks[0])
    assert [(r.prev, r.layers) for r in rules] == FOLDS[family]
    if family == "llama":  # grouped-query attention: v has 32 outputs, o reads 64
        assert any(line.startswith("self_attn.v_proj → self_attn.o_proj") for line in skipped)
    g = torch.Generator().manual_seed(5)
    want: dict[str, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        for rule in rules:
            prev = block.get_submodule(rule.prev)
            layers = [block.get_submodule(n) for n in rule.layers]
            s = torch.rand(_in_features(layers[0]), generator=g) * 3 + 0.2
            want.update({f"{i}.{rule.prev}.{k}": v for k, v in _scaled_outputs(prev, s).items()})
            want.update({f"{i}.{n}.weight": _scaled_inputs(m, s)
                         for n, m in zip(rule.layers, layers, strict=True)})
            fold_scale(prev, layers, s)
    state = blocks.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=0, msg=key)
    assert _rel_error(model, zoo.model(family), HELD_OUT) < 1e-5


def _local(family: str, name: str) -> str:
    """``model.layers.1.mlp.up_proj`` -> ``mlp.up_proj`` (the name inside its block)."""
    return name.removeprefix(BLOCKS[family] + ".").split(".", 1)[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_scaling_alone_is_an_identity(zoo: Zoo, family: str) -> None:
    fp32, result = zoo.model(family), zoo.result(family, "awq3_g32")
    floats = zoo.awq_float[family]
    assert sorted(floats) == sorted(_targets(fp32, family))
    scaled = copy.deepcopy(result.model)  # its norms hold the folded 1/s
    for name, layer in floats.items():
        scaled.set_submodule(name, copy.deepcopy(layer))
    assert _rel_error(scaled, fp32, HELD_OUT) < 1e-5
    # Only the layers and norms of foldable groups changed, and every group got real scales
    # in some block (the search may keep s = 1 in a block: α = 0 is on its grid).
    folded = {p for p, _ in FOLDS[family]} | {n for _, ls in FOLDS[family] for n in ls}
    blocks = BLOCKS[family] + "."
    changed = set()
    for name, p in scaled.named_parameters():
        if not torch.allclose(p, fp32.get_parameter(name), rtol=1e-4, atol=0):
            module = name.rsplit(".", 1)[0]
            assert module.startswith(blocks) and _local(family, module) in folded, name
            changed.add(_local(family, module))
    assert {layers[0] for _, layers in FOLDS[family]} <= changed
    if family == "bert":
        assert "no foldable preceding op" in " ".join(result.steps[0].notes)


# ---------------------------------------------------------------- pruners


@pytest.mark.parametrize(("family", "name"), PRUNE_CASES)
def test_pruners_reach_their_sparsity_on_every_target(zoo: Zoo, family: str, name: str) -> None:
    model, result = zoo.model(family), zoo.result(family, name)
    assert result.steps[0].modules == _targets(model, family)
    for n in _targets(model, family):
        weight = result.model.get_submodule(n).weight
        zeros = int((weight == 0).sum())
        if name == "swiftprune":  # its streaming threshold lands near, not on, the count
            assert abs(zeros / weight.numel() - 0.5) <= 0.02, n
        else:  # every width is even: half of each row, or of the layer, exactly
            assert zeros == weight.numel() // 2, n
    assert 0.0 < zoo.error(family, name) < 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_beats_magnitude(zoo: Zoo, family: str) -> None:
    assert zoo.error(family, "sparsegpt") < zoo.error(family, "magnitude")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", STRUCTURED_FAMILIES)
def test_structured_shrinks_the_model(zoo: Zoo, family: str) -> None:
    model, result = zoo.model(family), zoo.result(family, "structured")
    assert _n_params(result.model) < _n_params(model)
    assert 0.0 < zoo.error(family, "structured") < 1.0


@pytest.mark.parametrize("family", ("gpt2", "opt"))
def test_structured_refuses_layouts_it_cannot_couple(zoo: Zoo, family: str) -> None:
    model = copy.deepcopy(zoo.model(family))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"structured\.units: 'heads'.*not supported"):
        sl.compress(model, {"steps": [STRUCTURED]}, calibration=CALIBRATION, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

