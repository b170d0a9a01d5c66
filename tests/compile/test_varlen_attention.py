"""The packed varlen attention kernel against each sequence's softmax attention written out in
torch (the textbook answer), and what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slimline.compile import varlen_attention as varlen

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(bool(varlen.library_problem()), reason=varlen.library_problem()),
]


def textbook(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
             heads: int, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for each sequence and head, in float64."""
    out, start = [], 0
    for n in lengths:
        rows = slice(start, start + n)
        q1, k1, v1 = (t[rows].double().unflatten(-1, (heads, -1)).transpose(0, 1)
                      for t in (q, k, v))
        probs = torch.softmax(q1 @ k1.transpose(1, 2) * scale, dim=-1)
        out.append((probs @ v1).transpose(0, 1).flatten(1))
        start += n
    return torch.cat(out)


def packed(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, width, generator=g) for _ in range(3))
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, starts


@pytest.mark.parametrize(("lengths", "heads", "head"), [
    ([7, 1, 12, 3], 4, 8),
    ([46, 15, 38, 9, 1, 33], 12, 32),  # minilm's heads
    ([130, 17, 64, 0, 5], 2, 64),      # past 128 keys; an empty row
    ([20, 9], 3, 40),                  # a head of 32 + 8 columns
])
def test_float32_equals_the_textbook(lengths: list[int], heads: int, head: int) -> None:
    q, k, v, starts = packed(lengths, heads * head)
    scale = head ** -0.5
    got = varlen.varlen_attention(q, k, v, starts, heads, scale)
    want = textbook(q, k, v, lengths, heads, scale)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_rows_and_strided_views() -> None:
    """q, k, v as column blocks of one fused (T, 3W) projection, in bfloat16: read in place,
    arithmetic in float32, the output rounded once."""
    lengths, heads, head = [11, 30, 4], 4, 16
    width = heads * head
    fused = torch.randn(sum(lengths), 3 * width).bfloat16()
    q, k, v = fused.split(width, dim=1)
    starts = torch.tensor([0, 11, 41, 45])
    got = varlen.varlen_attention(q, k, v, starts, heads, 0.25)
    want = textbook(q, k, v, lengths, heads, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.bfloat16().double(), rtol=0, atol=2 ** -7)


def test_offsets_from_any_mask_and_the_flop_count() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    starts = varlen.starts_of(mask)
    assert starts.tolist() == [0, 2, 5, 5, 7]
    q, k, v, _ = packed([2, 3, 0, 2], 16)
    with FlopCounterMode(display=False) as counter:
        varlen.varlen_attention(q, k, v, starts, 2, 0.5)
    # two n × D · D × n products per sequence and head, 2 flops a multiply-add
    assert counter.get_total_flops() == sum(4 * n * n * 16 for n in (2, 3, 0, 2))


def test_under_torch_compile_with_tokens_of_any_count() -> None:
    run = torch.compile(lambda q, k, v, s: varlen.varlen_attention(q, k, v, s, 2, 0.5) * 2,
                        dynamic=True)
    for lengths in ([5, 3], [9, 1, 6]):
        q, k, v, starts = packed(lengths, 16, seed=len(lengths))
        torch.testing.assert_close(run(q, k, v, starts),
                                   2 * textbook(q, k, v, lengths, 2, 0.5).float(),
                                   rtol=1e-5, atol=1e-5)


def test_nan_stays_in_its_sequence() -> None:
    q, k, v, starts = packed([4, 6], 16)
    q[5, 3] = float("nan")  # the second sequence's second query, first head
    got = varlen.varlen_attention(q, k, v, starts, 2, 0.5)
    want = textbook(q, k, v, [4, 6], 2, 0.5)
    assert torch.equal(got.isnan(), want.isnan())
    assert bool(got[5, :8].isnan().all()) and not bool(got[:4].isnan().any())


def test_what_it_does_not_take() -> None:
    q, k, v, _ = packed([3, 2], 24)
    assert "multiples of 8" in varlen.unsupported(q, k, v, 12)
    assert "float32 or bfloat16" in varlen.unsupported(q.half(), k.half(), v.half(), 8)
    assert "(tokens, width)" in varlen.unsupported(q.t(), k, v, 8)
    grad = q.clone().requires_grad_()
    assert "autograd" in varlen.unsupported(grad, k, v, 8)
    with torch.no_grad():
        assert varlen.unsupported(grad, k, v, 8) == ""
    for starts in ([0, 4], [0, 4, 3, 5], [1, 5]):  # past the rows, falling, not from 0
        with pytest.raises(ValueError, match="must rise from 0 to the 5 packed rows"):
            varlen.varlen_attention(q, k, v, torch.tensor(starts), 3, 0.5)
    with pytest.raises(ValueError, match="one dtype"):
        varlen.varlen_attention(q, k.double(), v, torch.tensor([0, 5]), 3, 0.5)


def test_it_pays_on_short_rows_and_on_padding() -> None:
    def mask(lengths: list[int], width: int) -> torch.Tensor:
        return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()

    assert varlen.pays(mask([46, 3], 46))
    assert varlen.pays(mask([256] * 4, 256))  # short rows: always
    # past ALWAYS: by the real work Σ n² against the padded batch · length²
    assert not varlen.pays(mask([512, 505, 500, 510], 512))
    assert varlen.pays(mask([512, 20, 31, 8], 512))
    rows = [512, 400, 400, 400]
    share = sum(n * n for n in rows) / (4 * 512 * 512)
    assert varlen.pays(mask(rows, 512)) == (share <= varlen.WORK_SHARE)


# --- the padded layout: every query of a row over that row's real keys --------------------


def padded_textbook(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    heads: int, scale: float) -> torch.Tensor:
    """Each row's queries (padded ones too) over its keys the mask keeps, in float64."""
    batch, length = mask.shape
    out = []
    for b in range(batch):
        keep = mask[b] != 0
        rows = slice(b * length, (b + 1) * length)
        q1 = q[rows].double().unflatten(-1, (heads, -1)).transpose(0, 1)
        k1, v1 = (t[rows][keep].double().unflatten(-1, (heads, -1)).transpose(0, 1)
                  for t in (k, v))
        probs = torch.softmax(q1 @ k1.transpose(1, 2) * scale, dim=-1)
        out.append((probs @ v1).transpose(0, 1).flatten(1))
    return torch.cat(out)


def padded(mask: torch.Tensor, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(mask.numel(), width, generator=g) for _ in range(3))


def runs_mask(spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """A (batch, length) 0/1 mask whose row b keeps positions first .. first + n - 1."""
    positions = torch.arange(length)[None]
    first, count = (torch.tensor(c)[:, None] for c in zip(*spans, strict=True))
    return ((positions >= first) & (positions < first + count)).long()


def calls_of_the_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = varlen._attend

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen, "_attend", counted)
    return calls


@pytest.mark.parametrize(("spans", "heads", "head"), [
    ([(0, 9), (0, 4), (0, 1)], 4, 8),         # right padding, a one-token row
    ([(5, 4), (0, 9), (8, 1)], 2, 32),        # left padding
    ([(0, 46), (0, 15), (0, 38), (0, 3)], 12, 32),  # minilm's heads
])
def test_padded_rows_equal_the_textbook(spans: list[tuple[int, int]], heads: int, head: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    length = max(first + n for first, n in spans)
    mask = runs_mask(spans, length)
    q, k, v = padded(mask, heads * head)
    calls = calls_of_the_kernel(monkeypatch)
    got = varlen.padded_attention(q, k, v, mask, heads, head ** -0.5)
    assert calls == [1] and got.shape == q.shape
    torch.testing.assert_close(got.double(), padded_textbook(q, k, v, mask, heads, head ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_padded_masks_the_kernel_does_not_take_run_torch(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:  # fmt: skip
    """A hole in a row's keys, or a long nearly full batch (not paying): torch's masked
    attention, the same answer; a row with no key at all: what torch answers for it."""
    hole = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 0, 0]])
    q, k, v = padded(hole, 16)
    calls = calls_of_the_kernel(monkeypatch)
    got = varlen.padded_attention(q, k, v, hole, 2, 0.25)
    torch.testing.assert_close(got.double(), padded_textbook(q, k, v, hole, 2, 0.25),
                               rtol=1e-5, atol=1e-5)
    full = runs_mask([(0, 300), (0, 299)], 300)
    assert not varlen.pays_padded(int(full.sum()), 2, 300)
    q, k, v = padded(full, 16)
    got = varlen.padded_attention(q, k, v, full, 2, 0.25)
    torch.testing.assert_close(got.double(), padded_textbook(q, k, v, full, 2, 0.25),
                               rtol=1e-5, atol=1e-5)
    assert calls == []
    empty = torch.tensor([[1, 1, 0], [0, 0, 0]])
    q, k, v = padded(empty, 16)
    keep = (empty != 0)[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, 3, 2, 8).transpose(1, 2) for t in (q, k, v)), attn_mask=keep, scale=0.25)
    torch.testing.assert_close(varlen.padded_attention(q, k, v, empty, 2, 0.25),
                               want.transpose(1, 2).reshape(6, 16), equal_nan=True)


def test_padded_pays_by_the_work_of_long_rows() -> None:
    assert varlen.pays_padded(512, 2, 256)
    assert varlen.pays_padded(512 + 30 + 40 + 20, 4, 512)
    assert not varlen.pays_padded(512 + 500 + 505 + 510, 4, 512)


def brute_force_ranges(mask: torch.Tensor) -> tuple[list[list[int]], int] | None:
    """key_ranges by hand: each row's real positions, one run or None."""
    ranges, total = [], 0
    length = mask.shape[1]
    for b, row in enumerate(mask.tolist()):
        real = [i for i, m in enumerate(row) if m]
        if not real or real != list(range(real[0], real[0] + len(real))):
            return None
        ranges.append([b * length, length, b * length + real[0], len(real)])
        total += len(real)
    return ranges, total


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int64, torch.uint8,
                                   torch.float32])
def test_key_ranges_are_each_rows_run_of_real_keys(dtype: torch.dtype) -> None:
    """Runs (right and left padding, full rows), holes, empty rows, random masks and a
    non-contiguous view, against the brute-force scan."""
    g = torch.Generator().manual_seed(0)
    masks = [runs_mask([(0, 5), (2, 3), (0, 1), (4, 1)], 5), torch.ones(3, 7, dtype=torch.long),
             torch.tensor([[1, 0, 1]]), torch.tensor([[1, 1], [0, 0]]),
             runs_mask([(1, 6), (0, 9)], 9).t().contiguous().t()[:, :8]]
    masks += [(torch.rand(4, 6, generator=g) < 0.7).long() for _ in range(20)]
    for mask in masks:
        mask = mask.to(dtype)
        if dtype in (torch.uint8, torch.int8):
            mask = mask * 3  # any nonzero is real
        found = varlen.key_ranges(mask)
        want = brute_force_ranges(mask)
        if want is None:
            assert found is None, mask
        else:
            assert found is not None and found[0].tolist() == want[0] and found[1] == want[1]


def test_padded_bfloat16_strided_compiled_and_counted() -> None:
    mask = runs_mask([(0, 7), (2, 5)], 7)
    fused = torch.randn(14, 3 * 32).bfloat16()
    q, k, v = fused.split(32, dim=1)
    got = varlen.padded_attention(q, k, v, mask, 2, 0.25)
    want = padded_textbook(q, k, v, mask, 2, 0.25)
    torch.testing.assert_close(got.double(), want.bfloat16().double(), rtol=0, atol=2 ** -7)
    run = torch.compile(lambda q, k, v, m: varlen.padded_attention(q, k, v, m, 2, 0.25) + 1,
                        dynamic=True)
    for spans in ([(0, 5), (0, 2)], [(0, 3), (1, 8), (0, 9)]):
        mask = runs_mask(spans, max(a + n for a, n in spans))
        q, k, v = padded(mask, 16, seed=len(spans))
        torch.testing.assert_close(run(q, k, v, mask),
                                   padded_textbook(q, k, v, mask, 2, 0.25).float() + 1,
                                   rtol=1e-5, atol=1e-5)
    with FlopCounterMode(display=False) as counter:
        varlen.padded_attention(q, k, v, mask, 2, 0.25)
    assert counter.get_total_flops() == 4 * 9 * int(mask.sum()) * 16  # length · Σ n a head
    with pytest.raises(ValueError, match="mask for 27 rows"):
        varlen.padded_attention(q, k, v, mask[:, :5], 2, 0.25)
