"""slimline's gemv kernel: equal to the dequantized weight's product within float32's
rounding bound, on odd shapes and groups; chosen by QuantLinear for decode-sized calls;
opaque but counted under torch.compile and FlopCounterMode; warns once where it cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import slimline as sl
from slimline.quantize import kernels_gemv as gemv
from slimline.quantize import qlinear
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import GEMV_MAX_ROWS, QuantLinear

pytestmark = pytest.mark.skipif(
    gemv.library_problem() != "", reason=f"no gemv kernel here: {gemv.library_problem()}"
)
U32 = 2.0**-24  # unit roundoff of float32
# the float32 kernel's instruction sets this CPU runs (AVX2 everywhere the kernel builds)
FLOAT_ISAS = ["avx2"] + (["avx512"] if gemv._library().float_isa == "avx512" else [])


class Textbook:
    """A layer's weight rebuilt by hand from quantize_groups' codes (not from the packing)."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None,
                 symmetric: bool, scale_dtype: torch.dtype | None = None) -> None:
        q, scales, zeros = quantize_groups(weight, bits, group_size, symmetric,
                                           scale_dtype=scale_dtype)
        k = weight.shape[1]
        group = k if group_size is None else min(group_size, k)
        self.groups = scales.shape[1]
        s = scales.double().repeat_interleave(group, dim=1)[:, :k]  # (N, K)
        centre = 2 ** (bits - 1)
        if zeros is None:  # signed codes; stored as q + centre with zero point centre
            self.weight = q.double() * s
            self.magnitude = self.weight.abs()
        else:
            z = zeros.double().repeat_interleave(group, dim=1)[:, :k]
            self.weight = (q.double() - z) * s
            # what the kernel sums: (u - centre) · x per column and (centre - z) · Σx per group
            self.magnitude = ((q.double() - centre).abs() + (centre - z).abs()) * s

    def bound(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Worst-case float32 error of the kernel's sums: γ_n · Σ|terms|, n = K + G + 3."""
        n_ops = x.shape[-1] + self.groups + 3
        gamma = n_ops * U32 / (1 - n_ops * U32)
        return gamma * (x.abs().double() @ self.magnitude.t() + bias.abs().double())


def _layer(n: int, k: int, bits: int, group_size: int | None, symmetric: bool,
           scale_dtype: torch.dtype | None = None,
           decode_activations: str = "float") -> tuple[QuantLinear, Textbook]:
    linear = nn.Linear(k, n)
    q, scales, zeros = quantize_groups(linear.weight, bits, group_size, symmetric,
                                       scale_dtype=scale_dtype)
    layer = QuantLinear.from_codes(q, scales, zeros, bias=linear.bias, bits=bits,
                                   group_size=group_size, symmetric=symmetric,
                                   decode_activations=decode_activations)  # fmt: skip
    return layer, Textbook(linear.weight, bits, group_size, symmetric, scale_dtype)


@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "symmetric"),
    [(37, 200, 4, 128, False), (64, 256, 4, 128, True), (5, 98, 4, 34, True),
     (33, 100, 8, None, True), (17, 130, 8, 64, False), (40, 66, 4, None, False),
     (48, 320, 4, 32, True), (9, 72, 8, 24, True),
     (38, 384, 4, 64, False),  # one row of x: outputs four at a time, then a tail of two
     (38, 384, 4, 128, False), (21, 256, 4, None, True)],  # the same, with 128-column loads
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("isa", FLOAT_ISAS)
def test_equals_textbook_dequantized_product(n, k, bits, group_size, symmetric, rows,
                                             isa) -> None:
    layer, book = _layer(n, k, bits, group_size, symmetric)
    x = torch.randn(rows, k)
    assert layer.kernel_path(x) == "gemv"
    out = gemv._gemv(x, layer.qweight, layer.scales, layer.zeros, layer.bias, bits,
                     layer.group, isa=isa)  # fmt: skip
    if isa == gemv._library().float_isa:  # the layer's own call takes the best one
        assert torch.equal(out, layer(x))
    ref = x.double() @ book.weight.t() + layer.bias.double()
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert bool(((out.double() - ref).abs() <= book.bound(x, layer.bias)).all())
    wrong = x.double() @ book.weight.roll(1, dims=1).t() + layer.bias.double()  # columns off by one
    assert not bool(((wrong - ref).abs() <= book.bound(x, layer.bias)).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_instruction_sets_agree_on_a_decode_sized_layer(bits: int) -> None:
    """Each instruction set's kernel on a 2048-column layer (groups of 32, 128 and one a row,
    asymmetric), large enough for its threads: within float32's bound of the textbook
    product, so of each other."""
    for group_size, symmetric in [(32, True), (128, False), (None, True)]:
        layer, book = _layer(138, 2048, bits, group_size, symmetric)
        x = torch.randn(1, 2048)
        ref = x.double() @ book.weight.t() + layer.bias.double()
        for isa in FLOAT_ISAS:
            out = gemv._gemv(x, layer.qweight, layer.scales, layer.zeros, layer.bias, bits,
                             layer.group, isa=isa)  # fmt: skip
            assert bool(((out.double() - ref).abs() <= book.bound(x, layer.bias)).all()), isa


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reads_each_scale_dtype(scale_dtype: torch.dtype) -> None:
    layer, book = _layer(24, 160, 4, 64, False, scale_dtype)
    assert layer.scales.dtype == scale_dtype
    x = torch.randn(2, 160)
    ref = x.double() @ book.weight.t() + layer.bias.double()
    assert bool(((layer(x).double() - ref).abs() <= book.bound(x, layer.bias)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_round_once_at_the_end(dtype: torch.dtype) -> None:
    layer, book = _layer(32, 256, 4, 128, True)
    x = torch.randn(1, 1, 256).to(dtype)  # exact in float64 too
    ref = x.double() @ book.weight.t() + layer.bias.double()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (1, 1, 32)
    half_ulp = torch.finfo(dtype).eps / 2  # rounding the float32 sum to dtype
    if layer.kernel_path(x) == "gemv":
        tol = half_ulp * ref.abs() + (1 + half_ulp) * book.bound(x.float(), layer.bias)
    else:  # a CPU with native bf16 keeps torch's bf16 kernel: each weight rounded to bf16 too
        assert dtype == torch.bfloat16 and qlinear._native_bf16()
        magnitude = x.double().abs() @ book.weight.abs().t() + layer.bias.double().abs()
        tol = half_ulp * (ref.abs() + magnitude) + book.bound(x.float(), layer.bias)
    assert bool(((out.double() - ref).abs() <= tol).all())


def test_kernel_path_by_rows_and_extra_dims() -> None:
    layer, _ = _layer(16, 64, 8, None, True)
    assert layer.kernel_path(torch.zeros(2, GEMV_MAX_ROWS // 2, 64)) == "gemv"
    assert layer.kernel_path(torch.zeros(GEMV_MAX_ROWS + 1, 64)) == "dequant"
    many = torch.randn(GEMV_MAX_ROWS + 1, 64)
    torch.testing.assert_close(layer(many)[:3], layer(many[:3]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "symmetric"),
    [(37, 200, 4, 128, False), (5, 98, 4, 34, True), (17, 130, 8, 64, False),
     (40, 66, 4, None, False), (48, 320, 4, 32, True), (9, 72, 8, 24, True)],
)  # fmt: skip
@pytest.mark.parametrize("isa", FLOAT_ISAS)
def test_dequantized_rows_are_the_dequantized_weight_bit_for_bit(
    n, k, bits, group_size, symmetric, isa
) -> None:
    layer, _ = _layer(n, k, bits, group_size, symmetric)
    weight = layer.dequantized_weight()  # packing.dequantize, through torch ops
    for n0, n1 in [(0, n), (1, min(n, 4)), (n - 1, n)]:
        tile = gemv.dequantize_rows(layer.qweight, layer.scales, layer.zeros, in_features=k,
                                    bits=bits, group=layer.group, rows=(n0, n1), isa=isa)  # fmt: skip
        assert torch.equal(tile, weight[n0:n1])
    with pytest.raises(ValueError, match="rows 3..2"):
        gemv.dequantize_rows(layer.qweight, layer.scales, layer.zeros, in_features=k,
                             bits=bits, group=layer.group, rows=(3, 2))  # fmt: skip


def test_prefill_sized_calls_multiply_dequantized_tiles() -> None:
    """Past GEMV_MAX_ROWS rows an eager call multiplies tiles of the dequantized weight (more
    output rows than one tile holds): within float32's bound of the textbook product, and in
    bfloat16 within bfloat16's rounding of it; under autograd the torch path keeps gradients."""
    layer, book = _layer(1100, 2048, 4, 128, False)  # 512 rows a 4 MiB tile: three tiles
    x = torch.randn(2, GEMV_MAX_ROWS, 2048)
    assert layer.kernel_path(x) == "dequant" and layer._tiles_run(x)
    out = layer(x)
    ref = x.double() @ book.weight.t() + layer.bias.double()
    assert out.shape == (2, GEMV_MAX_ROWS, 1100) and out.dtype == torch.float32
    assert bool(((out.double() - ref).abs() <= book.bound(x, layer.bias)).all())
    half = layer(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    magnitude = x.double().abs() @ book.weight.abs().t() + layer.bias.double().abs()
    assert bool(((half.double() - ref).abs() <= 3 * 2.0**-8 * magnitude).all())
    grad_x = x.clone().requires_grad_()
    assert not layer._tiles_run(grad_x)
    layer(grad_x).sum().backward()
    torch.testing.assert_close(grad_x.grad, layer.dequantized_weight().sum(0).expand_as(x))


def test_inputs_that_need_gradients_keep_the_differentiable_path() -> None:
    layer, _ = _layer(16, 64, 4, 32, True)  # e.g. LoRA training on a quantized base
    x = torch.randn(2, 64, requires_grad=True)
    assert layer.kernel_path(x) == "dequant"
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(2, 64))
    with torch.no_grad():
        assert layer.kernel_path(x) == "gemv"


def test_grids_without_a_kernel_warn_once_naming_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(qlinear, "_WARNED", set())
    three = QuantLinear.from_float(nn.Linear(64, 16), bits=3, group_size=32, symmetric=True)
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = three(x)
        three(x)
    assert three.kernel_path(x) == "dequant"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "3-bit" in messages[0] and "Fix" in messages[0]
    torch.testing.assert_close(out, F.linear(x, three.dequantized_weight(), three.bias))
    assert gemv.gemv_unsupported(4, 65, 65, torch.float16)  # odd width: rows not byte-aligned
    assert gemv.gemv_unsupported(4, 64, 16, torch.float16) == ""


def test_save_load_keeps_bytes_and_output(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))
    result = sl.compress(model, {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    x = torch.randn(1, 96)
    out = result.model(x)
    assert result.model[0].kernel_path(x) == "gemv"
    sl.save(result.model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=nn.Sequential(nn.Linear(96, 64), nn.ReLU(),
                                                          nn.Linear(64, 8)))
    for key, tensor in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor)
    assert torch.equal(loaded(x), out)


def test_a_prepared_call_follows_the_buffers_it_reads() -> None:
    """The decode call kept per layer sees new values loaded in place, a replaced buffer, a
    move (``.to``) and survives deepcopy — never a stale pointer."""
    import copy

    layer, _ = _layer(24, 64, 4, 32, True)
    other, _ = _layer(24, 64, 4, 32, True)
    x = torch.randn(1, 64)
    layer(x)
    assert layer._decode_call(x) is not None
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), F.linear(x, other.dequantized_weight(), other.bias))
    third, _ = _layer(24, 64, 4, 32, True)
    layer.qweight, layer.scales = third.qweight.clone(), third.scales.clone()
    layer.bias = third.bias.clone()
    torch.testing.assert_close(layer(x), F.linear(x, third.dequantized_weight(), third.bias))
    twin = copy.deepcopy(layer)
    layer.to(torch.float64).to(torch.float32)  # _apply: buffers may move
    torch.testing.assert_close(twin(x), layer(x))


def test_a_prepared_call_takes_each_shape_it_is_given() -> None:
    """The call keeps the layout of the shape it last saw: shapes that follow one another,
    non-contiguous x and an empty batch give the reference; a wrong width is named. A bias
    made a parameter is followed too."""
    layer, _ = _layer(24, 64, 4, 32, False)
    reference = layer.dequantized_weight()
    call = gemv.GemvCall(layer.qweight, layer.scales, layer.zeros, layer.bias, in_features=64,
                         bits=4, group=layer.group)  # fmt: skip
    for x in (torch.randn(1, 1, 64), torch.randn(3, 64), torch.randn(2, 1, 64),
              torch.randn(64, 2).t(), torch.randn(1, 1, 64), torch.randn(0, 64)):
        torch.testing.assert_close(call(x), F.linear(x, reference, layer.bias))
    with pytest.raises(ValueError, match="64 inputs"):
        call(torch.randn(1, 32))
    layer.bias = nn.Parameter(torch.randn(24))
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), F.linear(x, reference, layer.bias))


def test_flop_counter_sees_the_kernel() -> None:
    layer, _ = _layer(64, 128, 4, 64, True)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(3, 128))
    assert counter.get_total_flops() == 2 * 3 * 128 * 64


def test_compiled_model_matches_eager() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    model[0] = QuantLinear.from_float(model[0], bits=4, group_size=64, symmetric=False)
    model[2] = QuantLinear.from_float(model[2], bits=8, group_size=None, symmetric=True)
    x = torch.randn(1, 128)
    # fullgraph: no break around the op; aot_eager traces it as inductor would, without codegen
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
