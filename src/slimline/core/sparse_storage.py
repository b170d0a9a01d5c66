"""Bitmask + values storage for tensors with many exact zeros (pruned weights).

A tensor of n elements with z zeros is stored as an n-bit mask (n/8 bytes) and its n − z
non-zero values, so a 50%-sparse fp32 weight takes 1/32 + 1/2 ≈ 0.53 of its dense bytes on
disk. Checkpoints use it for every float tensor it makes smaller by at least 10%; it is
lossless, so loading gives back the exact tensor.
"""

from __future__ import annotations

import torch

MASK_SUFFIX = ".__mask__"
VALUES_SUFFIX = ".__values__"
MIN_SAVING = 0.10  # encode only when at least 10% smaller: decoding costs load time

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)  # little-endian bit order in a byte


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → uint8 bytes, 8 flags per byte, little-endian within the byte."""
    flat = mask.flatten().to(torch.int32)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)  # (bytes, 8)
    return (flat * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` flags as a bool tensor."""
    bits = (packed.to(torch.int32).unsqueeze(1) // _BIT_WEIGHTS) % 2  # (bytes, 8)
    return bits.flatten()[:numel].bool()


def worth_encoding(tensor: torch.Tensor) -> bool:
    """True for a float tensor that bitmask storage makes ≥ ``MIN_SAVING`` smaller."""
    if not tensor.is_floating_point() or tensor.numel() < 64:
        return False
    if tensor.element_size() < 2:  # fp8: a 1-byte value, and no count_nonzero on CPU
        return False
    nonzero = int(torch.count_nonzero(tensor))
    dense = tensor.numel() * tensor.element_size()
    encoded = (tensor.numel() + 7) // 8 + nonzero * tensor.element_size()
    return encoded <= (1.0 - MIN_SAVING) * dense


def encode(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed mask of non-zeros, the non-zero values in row-major order)."""
    flat = tensor.flatten()
    mask = flat != 0
    return pack_bits(mask), flat[mask].contiguous()


def decode(packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of ``shape`` back from :func:`encode`'s two parts."""
    numel = 1
    for dim in shape:
        numel *= dim
    mask = unpack_bits(packed, numel)
    if int(mask.sum()) != values.numel():
        raise ValueError("sparse tensor: mask and values disagree")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.view(shape)
