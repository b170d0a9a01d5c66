"""The CUDA weight-only paths, checked without a GPU: byte order, shapes, the scale table's
meaning through the CPU twin of tinygemm, and which path a layer takes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.quantize import kernels_cuda as cuda
from slimline.quantize import kernels_weight_only as kernels
from slimline.quantize import qlinear
from slimline.quantize.qlinear import QuantLinear

ALL = {"_weight_int4pack_mm": True, "_weight_int8pack_mm": True}


def _path(bits: int = 4, dtype: torch.dtype = torch.bfloat16, **over) -> tuple[str, str]:
    fields = dict(bits=bits, symmetric=True, per_channel=bits == 8, out_features=2048,
                  in_features=5632, group=128 if bits == 4 else 5632, dtype=dtype, rows=1,
                  capability=(9, 0), registered=ALL)  # fmt: skip
    fields.update(over)
    return cuda.cuda_path(**fields)  # type: ignore[arg-type]


def test_nibble_pairs_put_the_even_column_in_the_high_nibble() -> None:
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    pairs = cuda.nibble_pairs(codes)
    assert pairs.dtype == torch.uint8 and pairs.shape == (8, 32) and pairs.is_contiguous()
    for n in range(8):
        for j in range(32):
            assert int(pairs[n, j]) == 16 * int(codes[n, 2 * j]) + int(codes[n, 2 * j + 1])
    with pytest.raises(ValueError, match="even K"):
        cuda.nibble_pairs(codes[:, :63])


@pytest.mark.parametrize(("k", "tiles"), [(5632, 8), (2048, 8), (64, 4), (96, 2), (40, None)])
def test_inner_k_tiles_is_the_widest_dividing_k(k: int, tiles: int | None) -> None:
    assert cuda.inner_k_tiles(k) == tiles


def test_int4_group_takes_tinygemm_s_shapes() -> None:
    assert cuda.int4_group(2048, 5632, 128) == 128
    assert cuda.int4_group(40, 256, 128) == 128  # N % 8 suffices on CUDA (the CPU needs 16)
    assert cuda.int4_group(2048, 2048, 2048) == 256  # per channel: its scale over groups of 256
    assert cuda.int4_group(44, 256, 128) is None  # N % 8
    assert cuda.int4_group(64, 200, 40) is None  # no group size the kernel has
    assert cuda.int4_group(64, 48, 48) is None  # K not a multiple of 32


def test_packed_shapes_through_the_operators_fake_kernels() -> None:
    """The packing and the matmul as torch's fake (meta) kernels see them: what a GPU call
    gives its arguments, with the shapes tinygemm documents."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # torch 2.13: shape propagation

    with FakeTensorMode():
        codes = torch.empty(48, 512, dtype=torch.uint8)
        packed = cuda.int4_weight(codes)
        assert packed.shape == (48 // 8, 512 // (16 * 8), 32, 4) and packed.dtype == torch.int32
        table = torch.empty(512 // 128, 48, 2, dtype=torch.bfloat16)
        x = torch.empty(2, 3, 512, dtype=torch.bfloat16)
        out = kernels.int4pack_linear(x, packed, 128, table, torch.empty(48))  # the CUDA op
        assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda.int4_weight(torch.zeros(8, 48, dtype=torch.uint8))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, None])
def test_the_cuda_table_is_the_layer_s_weight_through_the_cpu_twin(symmetric, group_size) -> None:
    """tinygemm computes ``(q - 8)·s + m`` per group like torch's CPU int4 kernel: the table
    the CUDA path builds (at the CUDA group), run through the CPU kernel, gives the layer's
    dequantized product (to bfloat16 rounding)."""
    torch.manual_seed(0)
    model = sl.compress(nn.Sequential(nn.Linear(256, 64)), {"steps": [
        {"method": "rtn", "bits": 4, "group_size": group_size, "symmetric": symmetric,
         "targets": {"include": ["*"]}}]}).model  # fmt: skip
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    group = cuda.int4_group(layer.out_features, layer.in_features, layer.group)
    assert group == (64 if group_size else 256)
    table = layer._int4_table(torch.bfloat16, group)
    assert table.shape == (256 // group, 64, 2)
    x = torch.randn(3, 256).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        layer.stored_codes().to(torch.int32), 1
    )
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, table)
    ref = x.float() @ layer.dequantized_weight().t()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_cuda_path_choices() -> None:
    assert _path() == ("int4pack_cuda", "")
    assert _path(rows=32) == ("int4pack_cuda", "")
    assert _path(rows=33) == ("dequant", "")  # prefill: dequantize + cuBLAS
    path, why = _path(dtype=torch.float32)
    assert path == "dequant" and "bfloat16" in why and "`half`" in why
    path, why = _path(capability=(7, 5))
    assert path == "dequant" and "sm_80+" in why and "sm_75" in why
    path, why = _path(out_features=2044)
    assert path == "dequant" and "out_features % 8" in why
    path, why = _path(registered={})
    assert path == "dequant" and "no CUDA int4 kernel" in why
    assert _path(bits=8, dtype=torch.float32) == ("int8pack_cuda", "")
    assert _path(bits=8, rows=17) == ("dequant", "")
    assert _path(bits=8, symmetric=False) == ("dequant", "")  # zero points: no kernel
    assert _path(bits=8, per_channel=False) == ("dequant", "")
    path, why = _path(bits=8, registered={"_weight_int4pack_mm": True})
    assert path == "dequant" and "int8" in why
    assert _path(bits=3) == ("dequant", "")
    assert _path(needs_grad=True) == ("dequant", "")  # the kernels have no backward (QLoRA)
    assert _path(bits=8, needs_grad=True) == ("dequant", "")
    assert _path(rows=0) == ("dequant", "")


def test_registered_on_cuda_follows_the_build() -> None:
    built = torch.backends.cuda.is_built()
    assert cuda.registered_on_cuda("_weight_int4pack_mm") == built
    assert not cuda.registered_on_cuda("no_such_operator_anywhere")


def test_quant_linear_takes_the_cuda_path_for_a_cuda_input(monkeypatch) -> None:
    """``kernel_path`` on a (fake) CUDA input asks :func:`cuda_path` with the layer's grid and
    warns once, naming the fix, where the input's dtype keeps it off the int4 kernel."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # torch 2.13

    model = sl.compress(nn.Sequential(nn.Linear(256, 64)), {"steps": [
        {"method": "rtn", "bits": 4, "group_size": 128, "targets": {"include": ["*"]}}]}).model
    layer = model[0]
    monkeypatch.setattr(qlinear, "_CAPABILITIES", {0: (9, 0)})
    monkeypatch.setattr(qlinear, "_CUDA_OPERATORS", dict(ALL))
    monkeypatch.setattr(qlinear, "_WARNED", set())
    mode = FakeTensorMode()

    def on_cuda(dtype: torch.dtype, rows: int) -> torch.Tensor:
        return FakeTensor(mode, torch.empty(rows, 256, dtype=dtype, device="meta"),
                          torch.device("cuda"))  # fmt: skip

    with mode:
        assert layer.kernel_path(on_cuda(torch.bfloat16, 1)) == "int4pack_cuda"
        assert layer.kernel_path(on_cuda(torch.bfloat16, 64)) == "dequant"
        with pytest.warns(RuntimeWarning, match="bfloat16 activations.*`half` step"):
            assert layer.kernel_path(on_cuda(torch.float32, 1)) == "dequant"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason
            assert layer.kernel_path(on_cuda(torch.float32, 1)) == "dequant"


@pytest.mark.parametrize("bits", [4, 8])
def test_the_cuda_branches_of_forward_compute_the_layer(bits, monkeypatch) -> None:
    """``forward``'s CUDA branches, run on the CPU: the int4 one with the packing swapped for
    its CPU twin (the matmul follows the layout: same table, same group), the int8 one as it
    is (torch's ``_weight_int8pack_mm`` has a CPU kernel); a bias and a 3-D input as a model
    gives them."""
    torch.manual_seed(1)
    model = sl.compress(nn.Sequential(nn.Linear(256, 48)), {"steps": [
        {"method": "rtn", "bits": bits, "group_size": 64 if bits == 4 else None,
         "targets": {"include": ["*"]}}]}).model  # fmt: skip
    layer = model[0]
    assert isinstance(layer, QuantLinear) and layer.bias is not None
    monkeypatch.setattr(layer, "kernel_path", lambda x: f"int{bits}pack_cuda")
    monkeypatch.setattr(
        cuda, "int4_weight",
        lambda codes: torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    out = layer(x)
    ref = x.float() @ layer.dequantized_weight().t() + layer.bias
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert set(layer._derived) - {"_sources"} == (
        {"int4_cuda_table", "int4_cuda_weight"} if bits == 4 else {"int8_weight"})
