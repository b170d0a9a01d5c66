"""``qat``: LSQ maths against hand-computed gradients, rtn at init, quality, conversion,
checkpoints, config errors, determinism and the 2-process (gloo) path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import slimline as sl
from slimline.quantize.packing import dequantize
from slimline.quantize.qat import (
    FakeQuantLinear,
    QatConfig,
    code_range,
    fake_quantize,
    lsq_grad_scale,
    train_qat,
)
from slimline.quantize.qlinear import GEMV_MAX_ROWS, QuantLinear


def _reference_lsq(w, s, low, high, g):
    """LSQ written the paper's way, with autograd: detach tricks for round and the scale."""
    s_g = (s - s * g).detach() + s * g  # value s, gradient × g
    s_k = s_g.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    r = torch.clamp(w / s_k, low, high)
    return (r + (torch.round(r) - r).detach()) * s_k


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _conv1d(module: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(module.out_features, module.in_features)
    with torch.no_grad():
        conv.weight.copy_(module.weight.t())
        conv.bias.copy_(module.bias)
    return conv


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group_size"), [(2, 16), (3, 20), (4, None), (8, 32)])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fake_quant_at_init_is_rtn_exactly(symmetric, bits, group_size, conv1d) -> None:
    layer = nn.Linear(70, 24)  # 70 = 3·20 + 10: a ragged last group
    module = _conv1d(layer) if conv1d else layer
    fake = FakeQuantLinear.from_float(module, QatConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    rtn = QuantLinear.from_float(module, bits=bits, group_size=group_size, symmetric=symmetric)
    assert torch.equal(fake.fake_weight(), rtn.dequantized_weight())
    assert torch.equal(fake.to_quant_linear().dequantized_weight(), rtn.dequantized_weight())
    x = torch.randn(GEMV_MAX_ROWS + 1, 70)  # F.linear on the dequantized weight: bit-exact
    assert torch.equal(fake(x), rtn(x))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group_size"), [(3, 20), (4, None)])
def test_fake_quant_from_a_packed_layer_starts_on_its_codes(symmetric, bits, group_size) -> None:
    # A packed layer whose codes are not rtn's (as GPTQ's are not): shift every code by one
    # step where the grid allows, so rounding the float weight afresh would not find them.
    rtn = QuantLinear.from_float(nn.Linear(70, 24), bits=bits, group_size=group_size,
                                 symmetric=symmetric)  # fmt: skip
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    codes = rtn.codes().to(torch.int16)
    shifted = torch.where(codes < high, codes + 1, codes - 1).clamp(low, high)
    packed = QuantLinear.from_codes(shifted.to(rtn.codes().dtype), rtn.scales, rtn.zeros,
                                    bias=rtn.bias, bits=bits, group_size=group_size,
                                    symmetric=symmetric)  # fmt: skip
    fake = FakeQuantLinear.from_quant_linear(packed)
    assert torch.equal(fake.fake_weight(), packed.dequantized_weight())
    x = torch.randn(GEMV_MAX_ROWS + 1, 70)
    torch.testing.assert_close(fake(x), packed(x), rtol=0, atol=1e-6)
    back = fake.to_quant_linear()  # untrained: the very same buffers
    for key, value in packed.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert fake.weight.requires_grad and fake.scales.requires_grad


def test_lsq_gradients_match_the_paper_by_hand() -> None:
    # s = 0.25 and 3-bit signed codes [-4, 3]; w / s = 1.25, -3.75, 0.25, 7 (clipped), -6 (clipped)
    w = torch.tensor([[0.3125, -0.9375, 0.0625, 1.75, -1.5]], requires_grad=True)
    s = torch.tensor([[0.25]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, -1.0, 0.5, 0.75]])
    g = lsq_grad_scale(5, 3)
    assert g == 1 / math.sqrt(15)
    out = fake_quantize(w, s, -4, 3, 5, g)
    torch.testing.assert_close(out, torch.tensor([[0.25, -1.0, 0.0, 0.75, -1.0]]), rtol=0, atol=0)
    (out * upstream).sum().backward()
    # ∂ŵ/∂w: 1 inside [-Q_N, Q_P], 0 clipped; ∂ŵ/∂s: round(r) - r inside, Q_P / -Q_N clipped
    assert w.grad.tolist() == [[1.0, 2.0, -1.0, 0.0, 0.0]]
    by_hand = 1 * (1 - 1.25) + 2 * (-4 + 3.75) + -1 * (0 - 0.25) + 0.5 * 3 + 0.75 * -4
    torch.testing.assert_close(s.grad, torch.tensor([[by_hand * g]]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_gradients_match_autograd_reference(symmetric: bool) -> None:
    torch.manual_seed(3)
    w = torch.randn(6, 32)
    zeros = None if symmetric else torch.randint(0, 8, (6, 4), dtype=torch.uint8)
    s = torch.rand(6, 4) * 0.3 + 0.05
    low, high = code_range(3, zeros)
    upstream = torch.randn(6, 32)
    grads = []
    for fn in (fake_quantize, None):
        wi, si = w.clone().requires_grad_(), s.clone().requires_grad_()
        if fn is None:
            lo_k = low if symmetric else low.repeat_interleave(8, dim=1)
            hi_k = high if symmetric else high.repeat_interleave(8, dim=1)
            out = _reference_lsq(wi, si, lo_k, hi_k, 0.1)
        else:
            out = fn(wi, si, low, high, 8, 0.1)
        (out * upstream).sum().backward()
        grads.append((out.detach(), wi.grad, si.grad))
    for ours, ref in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _kl(reference: nn.Module, model: nn.Module, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            p = reference(**batch).logits.log_softmax(-1)
            q = model(**batch).logits.log_softmax(-1)
            total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(batches)


def test_qat_beats_rtn_on_held_out_text_and_round_trips(tmp_path) -> None:
    from slimline.models import load_builtin

    built = load_builtin("code-llama-tiny", size="small")
    train = built.batches("train", batch_size=4, limit=8)
    held_out = built.batches("validation", batch_size=4, limit=4)
    spec = {"bits": 2, "group_size": 32}
    before = _state(built.model)
    rtn = sl.compress(built.model, {"steps": [{"method": "rtn", **spec}]}).model
    result = sl.compress(built.model, {"steps": [{"method": "qat", **spec, "steps": 48}]},
                         calibration=train)  # fmt: skip
    for k, v in built.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(result.steps[0].modules) == len(sl.Recipe.from_dict(
        {"steps": [{"method": "rtn"}]}).steps[0].select_modules(built.model))  # fmt: skip
    assert all(isinstance(m, QuantLinear) for n, m in result.model.named_modules()
               if n in result.steps[0].modules)  # fmt: skip
    kl_rtn, kl_qat = _kl(built.model, rtn, held_out), _kl(built.model, result.model, held_out)
    assert kl_qat < 0.7 * kl_rtn, (kl_qat, kl_rtn)

    sl.save(result.model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    with torch.no_grad():
        a, b = loaded(**held_out[0]).logits, result.model(**held_out[0]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _mlp_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 32, generator=g) for _ in range(n)]


def _fake_quantized(model: nn.Module, cfg: QatConfig) -> dict[str, FakeQuantLinear]:
    fakes = {name: FakeQuantLinear.from_float(m, cfg) for name, m in cfg.select_modules(model)}
    for name, layer in fakes.items():
        model.set_submodule(name, layer)
    return fakes


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group_size"), [(3, 20), (4, 32)])
def test_converted_layers_compute_the_trained_fake_quant(tiny_mlp, symmetric, bits, group_size) -> None:
    cfg = QatConfig(bits=bits, group_size=group_size, symmetric=symmetric, steps=12, lr=1e-3,
                    scale_lr=1e-3)  # fmt: skip
    model = copy.deepcopy(tiny_mlp)
    fakes = _fake_quantized(model, cfg)
    train_qat(model, list(fakes.values()), _mlp_batches(3), cfg)
    x = torch.randn(GEMV_MAX_ROWS + 1, 32)  # more rows than the gemv kernel takes: F.linear
    with torch.no_grad():
        trained = model(x)
        for name, layer in fakes.items():
            model.set_submodule(name, layer.to_quant_linear())
        converted = model(x)
        rtn_cfg = {"method": "rtn", "bits": bits, "group_size": group_size, "symmetric": symmetric}
        rtn = sl.compress(tiny_mlp, {"steps": [rtn_cfg]}).model
        assert not torch.allclose(trained, rtn(x), atol=1e-4)  # training did move it
        # The same weight (step sizes rounded to float16 in training too), the same F.linear:
        # bit-exact on the dequantize path.
        hidden = torch.zeros(len(x), model.fc2.in_features)  # what fc2 sees
        assert model.fc2.kernel_path(hidden) == "dequant"
        torch.testing.assert_close(converted, trained, rtol=0, atol=0)
        if bits == 4:  # one row runs a packed kernel: same weight, another summation order
            assert model.fc2.kernel_path(hidden[:1]) in ("gemv", "int4pack")
            torch.testing.assert_close(model(x[:1]), trained[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"bits": 9}, "bits"), ({"steps": 0}, "steps"), ({"lr": -1e-4}, "lr"),
     ({"scale_lr": float("nan")}, "scale_lr"), ({"lr": 0.0, "scale_lr": 0.0}, "scale_lr"),
     ({"loss": "mse"}, "loss"), ({"group_size": 0}, "group_size"), ({"steps": 2.5}, "steps")],
)  # fmt: skip
def test_bad_config_raises_naming_the_field_before_touching(tiny_mlp, fields, field) -> None:
    before = _state(tiny_mlp)
    with pytest.raises((ValueError, TypeError), match=f"qat.{field}"):
        sl.compress(tiny_mlp, {"steps": [{"method": "qat", **fields}]},
                    calibration=_mlp_batches(1), inplace=True)  # fmt: skip
    assert isinstance(tiny_mlp.fc1, nn.Linear)
    for k, v in tiny_mlp.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_missing_calibration_and_labels_raise_before_touching(tiny_mlp) -> None:
    before = _state(tiny_mlp)
    with pytest.raises(ValueError, match="'qat' needs training data"):
        sl.compress(tiny_mlp, {"steps": [{"method": "qat"}]}, inplace=True)
    with pytest.raises(ValueError, match="qat.loss: 'task' needs dict batches with 'labels'"):
        sl.compress(tiny_mlp, {"steps": [{"method": "qat", "loss": "task"}]},
                    calibration=_mlp_batches(1), inplace=True)  # fmt: skip
    for k, v in tiny_mlp.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mixed_precision_fields_are_not_qat_fields() -> None:
    """qat trains one width: it takes the grid, not rtn's mixed-precision fields."""
    with pytest.raises(ValueError, match="qat: unknown field"):
        sl.Recipe.from_dict({"steps": [{"method": "qat", "average_bits": 3.5}]})
    # Recipes saved while qat carried the fields unused (null, and the default choices) load.
    legacy = {"method": "qat", "bits": 3, "average_bits": None, "bit_choices": [3, 4, 8]}
    step = sl.Recipe.from_dict({"steps": [legacy]}).to_dict()["steps"][0]
    assert step["bits"] == 3 and "average_bits" not in step and "bit_choices" not in step


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 5)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(features))))
        return {"logits": self.head(hidden)}


def _classification_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    out = []
    for _ in range(n):
        labels = torch.randint(0, 5, (64,), generator=g)
        features = centres[labels] + torch.randn(64, 16, generator=g)  # overlapping classes
        out.append({"features": features, "labels": labels})
    return out


def test_task_loss_lowers_the_models_own_loss() -> None:
    torch.manual_seed(0)
    model = _Classifier().eval()
    train = _classification_batches(4, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # a trained float model first
    for _ in range(10):
        for batch in train:
            opt.zero_grad()
            logits = model(batch["features"])["logits"]
            nn.functional.cross_entropy(logits, batch["labels"]).backward()
            opt.step()

    def task(m: nn.Module) -> float:  # the loss qat minimises, on the batches it trained on
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(m(b["features"])["logits"], b["labels"]))
                       for b in train) / len(train)  # fmt: skip

    spec = {"bits": 2, "group_size": 16}
    rtn = sl.compress(model, {"steps": [{"method": "rtn", **spec}]}).model
    qat = sl.compress(model, {"steps": [{"method": "qat", "loss": "task", "steps": 80, "lr": 1e-3,
                                         **spec}]}, calibration=train)  # fmt: skip
    assert task(qat.model) < 0.85 * task(rtn), (task(model), task(rtn), task(qat.model))


def test_deterministic_given_seed(tiny_mlp) -> None:
    batches = _mlp_batches(3)

    def run(seed: int) -> dict[str, torch.Tensor]:
        cfg = {"method": "qat", "bits": 3, "group_size": 16, "steps": 5, "seed": seed, "lr": 1e-3}
        return _state(sl.compress(tiny_mlp, {"steps": [cfg]}, calibration=batches).model)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another batch order


# --- two processes, gloo: the path torchrun takes ----------------------------------------------


class _Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))}


_DIST_CFG = {"method": "qat", "bits": 3, "group_size": 16, "steps": 6, "lr": 1e-3}


def _dist_model() -> nn.Module:
    torch.manual_seed(7)
    return _Logits().eval()


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = sl.compress(_dist_model(), {"steps": [_DIST_CFG]}, calibration=_mlp_batches(2))
        save_file(result.model.state_dict(), f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_processes_average_gradients_like_one_big_batch(tmp_path) -> None:
    # One process on both batches at once: the mean of the two ranks' mean losses (equal
    # sizes), so the same gradients up to float rounding. Run first, so that the forked
    # ranks inherit every import (torch.optim's first use imports torch._dynamo).
    single = sl.compress(_dist_model(), {"steps": [_DIST_CFG]},
                         calibration=[torch.cat(_mlp_batches(2))]).model  # fmt: skip
    # fork: the ranks start in milliseconds instead of importing torch again; one thread each.
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # ranks agree exactly
    two = copy.deepcopy(single)
    two.load_state_dict(ranks[0])
    for name, module in single.named_modules():
        if isinstance(module, QuantLinear):
            other = two.get_submodule(name)
            assert (module.codes() == other.codes()).float().mean() > 0.99
            torch.testing.assert_close(other.scales, module.scales, rtol=2e-3, atol=0)
    rtn_cfg = {"method": "rtn", "bits": _DIST_CFG["bits"], "group_size": _DIST_CFG["group_size"]}
    rtn = sl.compress(_dist_model(), {"steps": [rtn_cfg]}).model
    x = torch.randn(8, 32)
    with torch.no_grad():
        torch.testing.assert_close(two(x)["logits"], single(x)["logits"], rtol=0, atol=1e-3)
        assert not torch.allclose(two(x)["logits"], rtn(x)["logits"], atol=1e-2)  # it trained


def test_dequantized_weight_of_the_converted_layer_matches_packing(tiny_mlp) -> None:
    cfg = QatConfig(bits=3, group_size=20, symmetric=False, steps=4, lr=1e-3)
    model = copy.deepcopy(tiny_mlp)
    fakes = _fake_quantized(model, cfg)
    train_qat(model, list(fakes.values()), _mlp_batches(2), cfg)
    for layer in fakes.values():
        quant = layer.to_quant_linear()
        assert quant.scales.dtype == torch.float16
        ref = dequantize(quant.codes(), quant.scales, quant.zeros, cfg.group_size)
        with torch.no_grad():
            assert torch.equal(layer.fake_weight(), ref)
