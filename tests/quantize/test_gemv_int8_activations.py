"""The int8-activation gemv kernel (``decode_activations: int8``): x rounded to int8 in blocks
of 32 exactly as a textbook per-block rounding does, and the product equal to the float64
product of those rounded activations with the textbook dequantized weight, on both
instruction sets the CPU offers (AVX2 and, where present, AVX-512 VNNI); chosen by
QuantLinear for decode-sized calls only where asked, carried through rtn/gptq and a save."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.quantize import kernels_gemv as gemv
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import GEMV_MAX_ROWS, QuantLinear
from tests.quantize.test_gemv import Textbook
from tests.quantize.test_gemv import _layer as gemv_layer

pytestmark = pytest.mark.skipif(
    gemv.library_problem() != "", reason=f"no gemv kernel here: {gemv.library_problem()}"
)
ISAS = ["avx2"] + (["avx512_vnni"] if gemv._library().isa == "avx512_vnni" else [])


def textbook_rounding(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded block by block, in float64: d = max|x|/127, q = nearest integer to
    x·(127/max|x|), ties to even (both factors as float32 computes them); returned as q·d."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for m in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            block = x[m, b : b + 32]
            top = block.abs().max()
            if top == 0:
                continue
            d, inv = float(top / 127), torch.tensor(127, dtype=torch.float32) / top  # float32
            for j, v in enumerate(block.tolist()):
                ratio = torch.tensor(v, dtype=torch.float32) * inv  # a float32 product
                q = round(float(ratio))  # Python's round: ties to even
                out[m, b + j] = max(-127, min(127, q)) * d
    return out


def test_round_activations_is_the_textbook_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 96) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(32)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    x[2, 5] = 2.5 * x[2, :32].abs().max() / 127  # near a tie
    q, s = gemv.round_activations(x)
    assert q.dtype == torch.int8 and s.shape == (3, 3)
    rebuilt = (q.double().unflatten(-1, (-1, 32)) * s.double().unsqueeze(-1)).flatten(-2)
    assert torch.equal(rebuilt, textbook_rounding(x))
    assert int(q.abs().max()) == 127


def _layer(n: int, k: int, bits: int, group_size: int | None, symmetric: bool,
           scale_dtype: torch.dtype | None = None) -> tuple[QuantLinear, Textbook]:
    return gemv_layer(n, k, bits, group_size, symmetric, scale_dtype, decode_activations="int8")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "symmetric", "scale_dtype"),
    [(37, 256, 4, 128, False, None), (64, 256, 4, 128, True, None),
     (21, 192, 4, 32, True, torch.bfloat16), (33, 96, 8, None, True, None),
     (17, 320, 8, 64, False, torch.float32), (40, 160, 4, None, False, None),
     (48, 384, 4, 96, True, None), (9, 64, 8, 32, True, torch.bfloat16),
     (19, 384, 4, None, True, torch.float16), (11, 512, 4, 256, False, None),
     # a short last group (K not whole chunks of the group's width)
     (13, 352, 4, 64, True, None), (15, 320, 4, 128, False, None), (12, 352, 8, 64, True, None)],
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 4, 7])
def test_equals_rounded_activations_times_textbook_weight(
    isa, n, k, bits, group_size, symmetric, scale_dtype, rows
) -> None:
    torch.manual_seed(n + k + rows)
    layer, book = _layer(n, k, bits, group_size, symmetric, scale_dtype)
    x = torch.randn(rows, k)
    xd = textbook_rounding(x)
    out = gemv._gemv(x, layer.qweight, layer.scales, layer.zeros, layer.bias, bits, layer.group,
                     True, isa=isa)  # fmt: skip
    ref = xd @ book.weight.t() + layer.bias.double()
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert bool(((out.double() - ref).abs() <= book.bound(xd, layer.bias)).all())
    # and it is not the float32-activation product: the rounding of x is really there
    exact = x.double() @ book.weight.t() + layer.bias.double()
    assert float((out.double() - exact).abs().max()) > float(book.bound(x, layer.bias).max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "symmetric"),
    [(38, 512, 4, 128, True), (21, 256, 4, 64, False), (23, 320, 8, None, True),
     (18, 192, 4, 32, True), (14, 128, 8, 64, False)],
)  # fmt: skip
def test_a_row_gives_the_same_bits_alone_or_among_others(
    isa, n, k, bits, group_size, symmetric
) -> None:
    """One row of x (a decode step: four outputs a pass) and the same row inside a call of 2-4
    rows (speculative verification) sum the same products in the same order: the same bits,
    so a verified token is the one plain decode would have produced."""
    torch.manual_seed(n * k)
    layer, _ = _layer(n, k, bits, group_size, symmetric)
    x = torch.randn(4, k)

    def call(rows: torch.Tensor) -> torch.Tensor:
        return gemv._gemv(rows, layer.qweight, layer.scales, layer.zeros, layer.bias, bits,
                          layer.group, True, isa=isa)  # fmt: skip

    alone = torch.cat([call(x[m : m + 1]) for m in range(4)])
    for rows in (2, 3, 4):
        assert torch.equal(call(x[:rows]), alone[:rows])


def test_quant_linear_takes_it_for_decode_sized_calls_only() -> None:
    torch.manual_seed(0)
    layer, _ = _layer(48, 128, 4, 32, True)
    few, many = torch.randn(2, 3, 128), torch.randn(GEMV_MAX_ROWS + 1, 128)
    assert layer.kernel_path(few) == "gemv_a8"
    assert layer.kernel_path(many) != "gemv_a8"  # prefill: F.linear on the dequantized weight
    assert layer.kernel_path(few.requires_grad_()) != "gemv_a8"  # no backward through it
    float_layer = QuantLinear.from_codes(
        *quantize_groups(nn.Linear(128, 8).weight, 4, 32, True), bias=None, bits=4,
        group_size=32, symmetric=True,
    )  # fmt: skip
    assert float_layer.kernel_path(torch.randn(1, 128)) == "gemv"  # the default stays float
    with torch.no_grad():
        y = layer(few.detach().bfloat16())  # any float dtype: widened, result cast back
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 48)


def test_nan_and_inf_are_carried_not_rounded() -> None:
    layer, _ = _layer(16, 64, 8, None, True)
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    with torch.no_grad():
        out = layer(x)
    assert bool(out[0].isnan().any())  # as the float path gives: not a rounded finite number
    assert not bool(out.isfinite().all())


def test_unsupported_grid_keeps_float_with_a_warning() -> None:
    linear = nn.Linear(48, 8)  # 48 columns: not whole blocks of 32
    layer = QuantLinear.from_float(linear, bits=4, group_size=None, symmetric=True,
                                   decode_activations="int8")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert layer.kernel_path(torch.randn(1, 48)) == "gemv"
    assert any("blocks of 32" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="decode_activations"):
        QuantLinear(64, 8, bits=4, group_size=None, symmetric=True, decode_activations="int4")


def test_recipe_field_reaches_the_layers_and_survives_a_save(tmp_path) -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.Linear(32, 8))

    torch.manual_seed(0)
    model = build()
    recipe = [{"method": "rtn", "bits": 4, "group_size": 32, "decode_activations": "int8",
               "targets": {"include": ["*"]}}]  # fmt: skip
    result = sl.compress(model, recipe)
    layers = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 3 and {m.decode_activations for m in layers} == {"int8"}
    sl.save(result.model, tmp_path / "out")
    loaded = sl.load(tmp_path / "out", model=build())
    again = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert {m.decode_activations for m in again} == {"int8"}
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    with pytest.raises(ValueError, match="decode_activations"):
        sl.compress(model, [{"method": "gptq", "decode_activations": "fast"}],
                    calibration=[torch.randn(4, 64)])  # fmt: skip
