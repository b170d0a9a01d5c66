"""slimline's W8A8 layers written in standard operators, for graph exporters and runtimes.

``Int8DynamicLinear`` and ``SmoothQuantLinear`` run their GEMM on a custom oneDNN op that no
exporter can lower. Their arithmetic is simple, though: activations rounded to a uint8 grid
(per token, or per tensor when static), an int8 weight with one scale per output channel, and
an exact integer product. :class:`W8A8Graph` computes the same numbers with operators every
runtime has — the activation grid as a fake quantization (round, clamp and rescale in
float32), the weight as int8 codes times their scales — so that:

* OpenVINO keeps the weight as an int8 constant (its ``Convert → Multiply`` decompression
  pattern) and runs the layer on a weight-compressed GEMM;
* the output equals the torch layer's to float32 rounding: the integer products are exact
  in both, and the activations are rounded by the same operations in the same order as
  :func:`slimline.quantize.kernels_int8.quantize_per_token` and ``quantize_static`` (so
  that ties round alike: see :meth:`W8A8Graph._static_grid`). A runtime that then fuses or
  reassociates the float32 operations around them still rounds some near-ties the other way
  (see ``export/parity.py``'s ``Tolerance``).

Layers are swapped only for the time of the export (:func:`lowered`), and given back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from slimline.export.parity import ATOL
from slimline.quantize.kernels_int8 import U8_OFFSET
from slimline.quantize.w8a8 import Int8DynamicLinear, SmoothQuantLinear


class W8A8Graph(nn.Module):
    """``y = x̂ · (q_W · s_w)ᵀ + b``, ``x̂`` the layer's input on its uint8 grid, dequantized.

    Buffers: ``qweight`` (N, K) int8, ``weight_scale`` (N, 1), ``bias`` (N,) or None,
    ``smooth`` (K,) or None (``Int8DynamicLinear`` has none) and, for a static grid,
    ``multiplier`` (K,) ``smooth / s_x``, with ``s_x`` and ``z_x`` as graph constants.
    """

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    smooth: torch.Tensor | None
    multiplier: torch.Tensor | None

    def __init__(self, layer: Int8DynamicLinear) -> None:
        super().__init__()
        self.bits = layer.activation_bits
        self.register_buffer("qweight", layer.qweight.detach().clone())
        self.register_buffer("weight_scale", layer.weight_scale.detach().float()[:, None].clone())
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        smooth = layer.smooth if isinstance(layer, SmoothQuantLinear) else None
        self.register_buffer("smooth", None if smooth is None else smooth.detach().clone())
        self.static: tuple[float, int] | None = None
        multiplier = None
        if isinstance(layer, SmoothQuantLinear) and layer.static:
            layer.refresh_kernels()
            self.static = layer._x_qparams
            multiplier = layer._derived["multiplier"].detach().clone()  # the kernel's own
        self.register_buffer("multiplier", multiplier)
        # Relative noise on the input before rounding, drawn from ``noise``; None in exports.
        self.jitter = 0.0
        self.noise: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.noise is not None:  # another runtime's float rounding, modelled (``jittered``)
            u = torch.rand(xf.shape, generator=self.noise, device=xf.device) * 2 - 1
            xf = xf * (1 + self.jitter * u)
        if self.static is not None:
            grid = self._static_grid(xf)
        else:
            grid = _per_token_grid(xf if self.smooth is None else xf * self.smooth, self.bits)
        weight = self.qweight.float() * self.weight_scale  # (N, K): int8 codes, then scale
        out = torch.nn.functional.linear(grid, weight, self.bias)
        return out.to(x.dtype)

    def _static_grid(self, xf: torch.Tensor) -> torch.Tensor:
        """``(u - z) · s`` of :func:`~slimline.quantize.kernels_int8.quantize_static`, with
        its operations in its order. Not a ``FakeQuantize``: OpenVINO's rounds ``x / s`` where
        the kernel rounds ``x · m + (z - 128)`` half to even, and the two disagree on ties,
        which real inputs hit (all-MiniLM-L6-v2: cosine 0.992 after six layers)."""
        if self.static is None or self.multiplier is None:
            raise RuntimeError("lowering: static activation grid used without its scale")
        scale, zero = self.static
        top = 2**self.bits - 1 - U8_OFFSET
        signed = torch.round(xf * self.multiplier + float(zero - U8_OFFSET))
        return (signed.clamp(-U8_OFFSET, top) + float(U8_OFFSET - zero)) * scale


def _per_token_grid(xf: torch.Tensor, bits: int) -> torch.Tensor:
    """``(u - z) · s`` of :func:`~slimline.quantize.kernels_int8.quantize_per_token`, with
    its operations in its order (so that float32 rounds them alike): no clamp is needed."""
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)  # (..., 1)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / float(2**bits - 3)).clamp(min=1e-12)
    zero = torch.round(-lo / scale) + 1.0
    signed = torch.round(xf * scale.reciprocal() + (zero - U8_OFFSET))  # u - 128
    return (signed + (U8_OFFSET - zero)) * scale


def check_lowering(model: nn.Module, run: Callable[[], object]) -> None:
    """Each W8A8 layer of ``model`` against its :class:`W8A8Graph` on the input it receives
    in ``run()`` (teacher-forced: the same input to both, so that no rounding flip upstream
    can reach it): ValueError when one differs by more than float32 rounding (a relative
    ``atol`` of :data:`~slimline.export.parity.ATOL`). This is what holds a W8A8 export to
    exactness layer by layer, whose end-to-end parity is loosened to the model's own
    rounding sensitivity (:func:`slimline.export.parity.within_rounding`)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (input, kernel output)

    def keep(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen.setdefault(name, (args[0].detach(), out.detach()))
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear)}
    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    for name, (x, kernel) in seen.items():
        with torch.no_grad():
            want, got = kernel.float(), W8A8Graph(layers[name])(x).float()
        scale = max(1.0, float(want.abs().max()))
        diff = float((want - got).abs().max())
        if diff > ATOL * scale:
            raise ValueError(f"export: W8A8 layer {name!r} written in standard operators differs "
                             f"from its kernel by {diff:.3g} (scale {scale:.3g}) on the same "
                             "input: a lowering fault, please report it")


# A few float32 ulps: how far a runtime's own kernels (fused sums, its erf and exp) move the
# values a W8A8 layer rounds. On all-MiniLM-L6-v2 (int8_dynamic) OpenVINO's export diverged from
# the torch kernels less than this modelled runtime does (cosine 0.99843 against 0.99756);
# on digits-cnn OpenVINO flipped a tie that torch's reordering alone did not.
JITTER = 1e-6


@contextlib.contextmanager
def jittered(model: nn.Module, jitter: float = JITTER) -> Iterator[None]:
    """Inside the block (and inside :func:`lowered`), every :class:`W8A8Graph` multiplies its
    input by ``1 + jitter·u`` before rounding, ``u`` uniform in [-1, 1] from a fixed seed:
    the torch model as another runtime's float rounding would feed its grids."""
    layers = [m for m in model.modules() if isinstance(m, W8A8Graph)]
    try:
        for i, layer in enumerate(layers):
            layer.jitter, layer.noise = jitter, torch.Generator().manual_seed(i)
        yield
    finally:
        for layer in layers:
            layer.jitter, layer.noise = 0.0, None


@contextlib.contextmanager
def lowered(model: nn.Module) -> Iterator[list[str]]:
    """Inside the block, every W8A8 layer of ``model`` is a :class:`W8A8Graph`; the names of
    the layers swapped are yielded, and the original layers are put back after."""
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, Int8DynamicLinear)}
    if "" in swapped:
        raise ValueError("export: the model is itself a W8A8 layer; export a module holding it")
    try:
        for name, layer in swapped.items():
            model.set_submodule(name, W8A8Graph(layer))
        yield list(swapped)
    finally:
        for name, layer in swapped.items():
            model.set_submodule(name, layer)
