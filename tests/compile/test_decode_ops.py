"""The C operations of ``fast_decode`` (``slimline.compile.decode_ops``) against textbook
computations in float64."""

from __future__ import annotations

import pytest
import torch

from slimline.compile import decode_ops
from slimline.quantize import kernels_gemv

pytestmark = pytest.mark.skipif(not decode_ops.available(),
                                reason="no C compiler / AVX2 for slimline's kernels here")


def test_available_wherever_the_gemv_kernels_are() -> None:
    assert decode_ops.available() == (kernels_gemv.library_problem() == "")


@pytest.mark.parametrize("n", [64, 2048, 77])
def test_rms_norm_is_the_textbook_formula(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(1, n, generator=g) * 3, torch.randn(n, generator=g)
    xd = x.double()
    expected = xd / torch.sqrt((xd * xd).mean() + 1e-6) * w.double()
    torch.testing.assert_close(decode_ops.rms_norm(x, w, 1e-6).double(), expected,
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_rotate_turns_each_pair_by_its_angle_and_leaves_x() -> None:
    x, angles = torch.randn(5, 16), torch.rand(8) * 6
    before = x.clone()
    cos, sin = torch.cat([angles.cos()] * 2).view(1, 16), torch.cat([angles.sin()] * 2).view(1, 16)
    z = torch.complex(x[:, :8].double(), x[:, 8:].double()) * torch.polar(
        torch.ones(8, dtype=torch.float64), angles.double())  # pair (i, i+8)
    out = decode_ops.rotate(x, cos, sin)
    torch.testing.assert_close(out.double(), torch.cat([z.real, z.imag], dim=-1),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    assert torch.equal(x, before)  # a new tensor: x may be one a hook kept


def test_reads_only_contiguous_float32() -> None:
    x = torch.randn(4, 8)
    assert decode_ops.reads(x, torch.randn(8))
    assert not decode_ops.reads(x.bfloat16())
    assert not decode_ops.reads(torch.randn(8, 4).t())  # columns, not rows, contiguous
    assert not decode_ops.reads(torch.randn(4, 16)[:, ::2])


def test_fast_decode_runs_them_and_matches_the_torch_ops(tiny_llama) -> None:
    from slimline.compile.fast_decode import FastForward, decode_step

    assert FastForward(tiny_llama).c_ops  # the written-out step takes the C operations here
    from transformers import DynamicCache

    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        caches = [DynamicCache(config=tiny_llama.config) for _ in range(2)]
        for cache in caches:
            tiny_llama(input_ids=ids, past_key_values=cache, use_cache=True)
        token = torch.tensor([[5]])
        torch_ops, c_ops = (decode_step(tiny_llama, token, cache, c_ops=c)
                            for cache, c in zip(caches, (False, True), strict=True))
    torch.testing.assert_close(c_ops, torch_ops, rtol=1e-5, atol=1e-5)
