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

For ONNX the same layer is written in *integer* form (``lowered(model, integer=True)``): the
activation codes cast to uint8 and multiplied by the int8 weight in ONNX's ``MatMulInteger``
(``export/integer_ops.py``), which onnxruntime runs on its int8 GEMM, then scaled as the torch
kernel scales its int32 sums. A layer with 7-bit activations (the grid of CPUs without an int8
dot product) is written u8·s8; one with 8-bit activations u8·u8 — the weight shifted by 128,
with 128 as its zero point — because onnxruntime's u8·s8 GEMM on such CPUs adds product pairs
into a saturating int16, as oneDNN does (``quantize/kernels_int8.py``; measured here: off by
up to 3·10^5 on 8-bit codes), and its u8·u8 one does not: the file is exact on every CPU.

Layers are swapped only for the time of the export (:func:`lowered`), and given back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.export.graph import GraphForward, references
from slimline.export.integer_ops import matmul_integer
from slimline.export.parity import ATOL, ROUNDING_SPREAD, Tolerance, loosest, within_rounding
from slimline.quantize.kernels_int8 import U8_OFFSET, weight_offset
from slimline.quantize.w8a8 import Int8DynamicLinear, SmoothQuantLinear


class W8A8Graph(nn.Module):
    """``y = x̂ · (q_W · s_w)ᵀ + b``, ``x̂`` the layer's input on its uint8 grid, dequantized.

    Buffers: ``qweight`` (N, K) int8, ``weight_scale`` (N, 1), ``bias`` (N,) or None,
    ``smooth`` (K,) or None (``Int8DynamicLinear`` has none) and, for a static grid,
    ``multiplier`` (K,) ``smooth / s_x``, with ``s_x`` and ``z_x`` as graph constants.
    ``integer``: the integer form (module doc), which also holds ``weight_t`` (K, N) — int8,
    or uint8 shifted by 128 for 8-bit activations — with its zero point, and ``w_offset``
    (N,) ``s_w · Σ_k q_W`` (see :func:`slimline.quantize.kernels_int8.rescale`) for a
    per-token grid, ``out_scale`` (N,) ``s_x · s_w`` for a static one.
    """

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    smooth: torch.Tensor | None
    multiplier: torch.Tensor | None
    weight_t: torch.Tensor
    weight_zero: torch.Tensor
    x_zero: torch.Tensor
    w_offset: torch.Tensor
    out_scale: torch.Tensor

    def __init__(self, layer: Int8DynamicLinear, *, integer: bool = False) -> None:
        super().__init__()
        self.bits = layer.activation_bits
        self.integer = integer
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
        if integer:
            self._integer_buffers()
        # Relative noise on the input before rounding, drawn from ``noise``; None in exports.
        self.jitter = 0.0
        self.noise: torch.Generator | None = None

    def _integer_buffers(self) -> None:
        codes = self.qweight.t().contiguous()  # (K, N)
        if self.bits > 7:  # u8·u8: no saturating int16 pair sums on any CPU (module doc)
            weight_t = (codes.to(torch.int16) + U8_OFFSET).to(torch.uint8)
            weight_zero = torch.tensor(U8_OFFSET, dtype=torch.uint8)
        else:
            weight_t, weight_zero = codes, torch.tensor(0, dtype=torch.int8)
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("weight_zero", weight_zero)
        zero = 0 if self.static is None else self.static[1]  # a static grid's, a scalar
        self.register_buffer("x_zero", torch.tensor(zero, dtype=torch.uint8))
        scale = self.weight_scale[:, 0]
        if self.static is None:  # the per-token zero points' term (rescale)
            self.register_buffer("w_offset", weight_offset(self.qweight, scale))
        else:  # s_x · s_w, one factor per output
            self.register_buffer("out_scale", scale * self.static[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.noise is not None:  # another runtime's float rounding, modelled (``jittered``)
            u = torch.rand(xf.shape, generator=self.noise, device=xf.device) * 2 - 1
            xf = xf * (1 + self.jitter * u)
        if self.static is not None:
            signed = self._static_codes(xf)
            scale: torch.Tensor | float = self.static[0]
            zero: torch.Tensor | float = float(self.static[1])
        else:
            signed, scale, zero = _per_token_codes(xf if self.smooth is None else xf * self.smooth,
                                                   self.bits)  # fmt: skip
        if self.integer:
            out = self._integer_gemm(signed, scale, zero)
        else:
            grid = (signed + (U8_OFFSET - zero)) * scale  # (u - z) · s
            weight = self.qweight.float() * self.weight_scale  # (N, K): int8 codes, then scale
            out = torch.nn.functional.linear(grid, weight, self.bias)
        return out.to(x.dtype)

    def _integer_gemm(self, signed: torch.Tensor, scale: torch.Tensor | float,
                      zero: torch.Tensor | float) -> torch.Tensor:  # fmt: skip
        """The int32 GEMM on uint8 codes, scaled as the torch kernel scales it."""
        codes = (signed + float(U8_OFFSET)).to(torch.uint8)
        acc = matmul_integer(codes, self.weight_t, self.x_zero, self.weight_zero).float()
        if self.static is not None:  # Σ (u - z) · q_W, then s_x · s_w and the bias
            out = acc * self.out_scale
            return out if self.bias is None else out + self.bias
        # rescale(): s_x · (s_w · Σ u · q_W - z · w_offset) + b
        offset = (scale * zero) * -self.w_offset
        base = offset if self.bias is None else self.bias + offset
        return base + (acc * self.weight_scale[:, 0]) * scale

    def _static_codes(self, xf: torch.Tensor) -> torch.Tensor:
        """``u - 128`` of :func:`~slimline.quantize.kernels_int8.quantize_static`, with its
        operations in its order. Not a ``FakeQuantize``: OpenVINO's rounds ``x / s`` where
        the kernel rounds ``x · m + (z - 128)`` half to even, and the two disagree on ties,
        which real inputs hit (all-MiniLM-L6-v2: cosine 0.992 after six layers)."""
        if self.static is None or self.multiplier is None:
            raise RuntimeError("lowering: static activation grid used without its scale")
        top = 2**self.bits - 1 - U8_OFFSET
        signed = torch.round(xf * self.multiplier + float(self.static[1] - U8_OFFSET))
        return signed.clamp(-U8_OFFSET, top)


def _per_token_codes(
    xf: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u - 128``, ``s`` and ``z`` of
    :func:`~slimline.quantize.kernels_int8.quantize_per_token`, with its operations in its
    order (so that float32 rounds them alike): no clamp is needed."""
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)  # (..., 1)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / float(2**bits - 3)).clamp(min=1e-12)
    zero = torch.round(-lo / scale) + 1.0
    signed = torch.round(xf * scale.reciprocal() + (zero - U8_OFFSET))  # u - 128
    return signed, scale, zero


def check_lowering(model: nn.Module, run: Callable[[], object], *, integer: bool = False
                   ) -> None:  # fmt: skip
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
            want, got = kernel.float(), W8A8Graph(layers[name], integer=integer)(x).float()
        scale = max(1.0, float(want.abs().max()))
        diff = float((want - got).abs().max())
        if diff > ATOL * scale:
            form = "integer" if integer else "standard"
            raise ValueError(f"export: W8A8 layer {name!r} written in {form} operators differs "
                             f"from its kernel by {diff:.3g} (scale {scale:.3g}) on the same "
                             "input: a lowering fault, please report it")


# A few float32 ulps: how far a runtime's own kernels (fused sums, its erf and exp) move the
# values a W8A8 layer rounds. On all-MiniLM-L6-v2 (int8_dynamic) OpenVINO's export diverged from
# the torch kernels less than this modelled runtime does (cosine 0.99843 against 0.99756);
# on digits-cnn OpenVINO flipped a tie that torch's reordering alone did not.
JITTER = 1e-6

# How many modelled runtimes an export's tolerance is the loosest of. The largest difference
# a cascade of flips makes is an extreme of a heavy-tailed draw: on minilm structured 50% +
# 20 distill steps + int8_dynamic (left-padded example) one draw moved an output by 0.113,
# ONNX Runtime's integer GEMMs by 0.243 — while its cosine (0.99983) was closer than the
# draw's (0.99969); eight draws reached 0.200 there.
JITTER_DRAWS = 8


@contextlib.contextmanager
def jittered(model: nn.Module, jitter: float = JITTER, draw: int = 0) -> Iterator[None]:
    """Inside the block (and inside :func:`lowered`), every :class:`W8A8Graph` multiplies its
    input by ``1 + jitter·u`` before rounding, ``u`` uniform in [-1, 1] from a seed fixed by
    the layer's place and ``draw``: the torch model as another runtime's float rounding would
    feed its grids (each ``draw`` a different runtime)."""
    layers = [m for m in model.modules() if isinstance(m, W8A8Graph)]
    try:
        for i, layer in enumerate(layers):
            seed = draw * len(layers) + i
            layer.jitter, layer.noise = jitter, torch.Generator().manual_seed(seed)
        yield
    finally:
        for layer in layers:
            layer.jitter, layer.noise = 0.0, None


@contextlib.contextmanager
def lowered(model: nn.Module, *, integer: bool = False) -> Iterator[list[str]]:
    """Inside the block, every W8A8 layer of ``model`` is a :class:`W8A8Graph` (in integer
    form with ``integer``); the names of the layers swapped are yielded, and the original
    layers are put back after."""
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, Int8DynamicLinear)}
    if "" in swapped:
        raise ValueError("export: the model is itself a W8A8 layer; export a module holding it")
    try:
        for name, layer in swapped.items():
            model.set_submodule(name, W8A8Graph(layer, integer=integer))
        yield list(swapped)
    finally:
        for name, layer in swapped.items():
            model.set_submodule(name, layer)


def rounding_tolerances(
    graph: GraphForward, examples: list[Batch], outputs: list[torch.Tensor], tol: Tolerance,
    *, lowered: bool,
) -> tuple[list[Tolerance], list[dict[str, Any]]]:
    """Each example's parity tolerance: ``tol``, or for a model with lowered W8A8 layers
    (called inside :func:`lowered`) the loosest that
    :func:`~slimline.export.parity.within_rounding` derives from :data:`JITTER_DRAWS` runs of
    the torch model through the lowered layers with their inputs :func:`jittered` (runtimes'
    float rounding, modelled), with the widest divergence seen for the export report."""
    if not lowered:
        return [tol] * len(examples), []
    draws = []
    for draw in range(JITTER_DRAWS):
        with jittered(graph, draw=draw):
            draws.append(references(graph, examples)[1])
    tols, rounding = [], []
    for i, (batch, reference) in enumerate(zip(examples, outputs, strict=True)):
        measured = [within_rounding(reference, draw[i], batch, tol) for draw in draws]
        limit = loosest([m[0] for m in measured])
        seen = [m[1] for m in measured]
        tols.append(limit)
        rounding.append({"shape": seen[0].shape,
                         "torch_lowered_max_abs_diff": max(c.max_abs_diff for c in seen),
                         "torch_lowered_cosine": min(c.cosine for c in seen), **limit.to_dict()})
    return tols, rounding


# Appended to a W8A8 export's parity failure.
ROUNDING_HINT = (
    ". The model has W8A8 layers, whose activation rounding flips at near-ties when a runtime "
    f"reorders float sums; each check above was already loosened to {ROUNDING_SPREAD:g}x the "
    f"widest divergence of the torch model run as {JITTER_DRAWS} other runtimes would round "
    "(report details: "
    "w8a8_rounding). To accept more, pass min_cosine (--min-cosine) and atol with the "
    "agreement you accept"
)
