"""Mixed precision, the measurement: each layer's sensitivity and stored size at each width.

The allocation that uses them is :mod:`slimline.quantize.mixed` (HAWQ-V3's integer
program, arXiv 2011.10680); what is measured, for the weight-only quantizers ``rtn``,
``gptq``, ``hqq``:

* **sensitivity** ``e_l(b)`` of layer l at b bits: to second order, what quantizing that
  layer alone costs at the *model's* output — the KL divergence from the unquantized model's
  next-token distribution when the model returns ``logits``, the squared error of its output
  otherwise. The curvature of that cost with respect to the layer's weight is factored as in
  K-FAC (Martens & Grosse, arXiv 1503.05671), ``A ⊗ G``: ``A = X Xᵀ / n`` from the layer's
  inputs (GPTQ's layer Hessian) and ``G = diag E[g gᵀ]`` from the gradients g at the layer's
  outputs of a probe loss whose expected curvature is the cost's (labels sampled from the
  model's own softmax: the Fisher; or a Gaussian projection of the output: Gauss–Newton).
  Then ``e_l(b) = Σ_n G_nn (ΔW A ΔWᵀ)_nn``, ``ΔW = W − Q_b(W)`` for the method's own quantizer.
  The ``G`` factor is what makes layers comparable: ``tr(ΔW A ΔWᵀ)`` alone measures each
  layer's error in its own output's units, and a layer whose output is amplified downstream
  looks cheap to it — on a three-layer MLP that alone gave 1.1–2.1× the output error of
  uniform widths at the same size (rtn, five seeds), and on code-llama-tiny (rtn, 3.5 bits)
  +1.17% perplexity against +1.01% with ``G``.
  Without calibration data ``A = G = I``: ``e_l(b) = ‖ΔW‖²_F``.
* **size** ``s_l(b)``: the bits the layer stores at b bits — packed codes, scales and zero
  points exactly as the quantizer produced them (float32 scales where float16 would not do);
  the bias is left out, being the same at every width.

Cost: with calibration data, one forward and backward pass over it (the whole model's
activations for one batch are alive, unlike the block-by-block passes of GPTQ), then one
block-by-block pass for ``A``; each layer is quantized once per width (for ``gptq``, one GPTQ
solve per width). Layers must be differentiable with respect to their inputs for ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slimline.core.batches import Batch, forward, output_tensor, token_mask
from slimline.core.calibration import RealTokens, sequential_layers
from slimline.core.statistics import InputStats, stream_uniform
from slimline.core.targets import linear_weight
from slimline.quantize.packing import dequantize, packed_numel

# ``(N, K) weight, bits, A -> (codes, scales, zeros)`` as :func:`packing.quantize_groups`
# returns them: signed codes and no zeros when symmetric, uint8 codes and zero points otherwise.
# A is the layer's (K, K) input Hessian X Xᵀ / n when there is calibration data, else None;
# quantizers that use no data ignore it.
Quantizer = Callable[[torch.Tensor, int, torch.Tensor | None], Sequence[torch.Tensor | None]]


def stored_bits(numel: int, bits: int, scales: torch.Tensor, zeros: torch.Tensor | None) -> int:
    """Bits a layer stores for ``numel`` weights: packed codes + scales + zero points."""
    total = packed_numel(numel, bits) + scales.numel() * scales.element_size()
    if zeros is not None:
        total += zeros.numel() * zeros.element_size()
    return 8 * total


def output_error(
    delta: torch.Tensor, hessian: torch.Tensor | None, gain: torch.Tensor | None = None
) -> float:
    """``Σ_n G_nn (ΔW A ΔWᵀ)_nn`` for ΔW (N, K), A = ``hessian`` (K, K), G = ``gain`` (N,).

    ``hessian`` None stands for A = I and ``gain`` None for G = I: ``tr(ΔW A ΔWᵀ)``, ``‖ΔW‖²``.
    """
    d = delta.float()
    rows = d.pow(2) if hessian is None else (d @ hessian.float()) * d  # (N, K)
    per_row = rows.double().sum(dim=1)  # (N,) the diagonal of ΔW A ΔWᵀ
    if gain is not None:
        per_row = per_row * gain.double()
    return float(per_row.sum())


@dataclass(frozen=True)
class Candidates:
    """Per layer and width: sensitivity ``errors`` and stored ``sizes`` (bits)."""

    errors: dict[str, dict[int, float]]
    sizes: dict[str, dict[int, int]]
    weighted: bool  # True when errors are Hessian-weighted (calibration data was given)


def layer_candidates(
    weight: torch.Tensor,
    quantize: Quantizer,
    bit_choices: Sequence[int],
    group_size: int | None,
    hessian: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
) -> tuple[dict[int, float], dict[int, int]]:
    """One layer's (errors, sizes) per width: :func:`output_error` and stored bits."""
    w = weight.detach().float()  # (N, K)
    errors, sizes = {}, {}
    for bits in bit_choices:
        q, scales, zeros = quantize(w, bits, hessian)
        if q is None or scales is None:
            raise ValueError("a quantizer must return codes and scales")
        delta = w - dequantize(q, scales, zeros, group_size)  # (N, K)
        errors[bits] = output_error(delta, hessian, gain)
        sizes[bits] = stored_bits(q.numel(), bits, scales, zeros)
    return errors, sizes


class _ProbeDraws:
    """The random draws of the probe loss, tied to each real token's (or row's) place in the
    calibration stream: padded batches and the same sequences one at a time draw alike."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tokens = 0  # real tokens drawn for so far
        self.rows = 0  # output rows drawn for so far

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """One class per row of ``probs`` (n, V), drawn from it (Gumbel-max)."""
        n, v = probs.shape
        index = (torch.arange(self.tokens, self.tokens + n)[:, None] * v + torch.arange(v))
        self.tokens += n
        gumbel = -torch.log(-torch.log(stream_uniform(index, self.seed)))  # (n, V)
        return (probs.double().clamp_min(1e-300).log() + gumbel).argmax(dim=1)

    def normal(self, shape: torch.Size) -> torch.Tensor:
        """N(0, 1) draws of ``shape`` (rows, ...), one stream position per element."""
        n, width = shape[0], math.prod(shape[1:])
        index = torch.arange(self.rows * width, (self.rows + n) * width)
        self.rows += n
        u = stream_uniform(index, self.seed + 1)
        return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).reshape(shape)


def _probe_loss(
    output: object, batch: Batch, draws: _ProbeDraws, real: RealTokens
) -> torch.Tensor:
    """A loss whose gradients' expected outer product is the curvature of the output cost.

    Logits: cross-entropy to labels drawn from the model's own softmax — its expected
    gradient outer product is the Fisher, the Hessian of the KL divergence at the model.
    Only the real tokens ``real`` keeps (the batch's mask) get a label. Other outputs:
    ``⟨output, v⟩`` with v ~ N(0, I) — ``E[g gᵀ] = JᵀJ``, the Gauss–Newton matrix of ½‖Δoutput‖².
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        flat = real.keep(logits).reshape(-1, logits.shape[-1]).float()  # (real tokens, classes)
        labels = draws.labels(flat.detach().softmax(dim=-1).cpu()).to(flat.device)
        return torch.nn.functional.cross_entropy(flat, labels, reduction="sum")
    out = output_tensor(output, batch)
    v = draws.normal(out.shape).to(out.device, out.dtype)
    return (out * v).sum()


def output_gains(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[Batch],
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per layer, ``G_nn`` (N,): the mean over real tokens of the squared probe-loss gradient
    at each of its output features (see :func:`_probe_loss`); the model is left unchanged.
    A ``Conv2d``'s features are its output channels (C_out,), every position a token."""
    draws = _ProbeDraws(seed)
    real = RealTokens()
    names = list(layers)
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    sums: dict[str, torch.Tensor] = {}
    tokens = dict.fromkeys(names, 0)
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, _n=n: outputs[_n].append(out))
        for n, m in layers.items()
    ]
    try:
        for p in flags:
            p.requires_grad_(False)
        for module in layers.values():  # the graph needs to reach every layer's output
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        with torch.enable_grad():
            for batch in calibration:
                for kept in outputs.values():
                    kept.clear()
                real.mask = token_mask(batch)
                loss = _probe_loss(forward(model, batch), batch, draws, real)
                seen = [(n, out) for n in names for out in outputs[n] if out.requires_grad]
                if not loss.requires_grad or not seen:
                    raise ValueError("mixed precision needs gradients at the layers' outputs, "
                                     "but the model's forward runs without autograd")
                grads = torch.autograd.grad(loss, [out for _, out in seen], allow_unused=True)
                for (name, out), grad in zip(seen, grads, strict=True):
                    g = torch.zeros_like(out) if grad is None else grad.detach()
                    if isinstance(layers[name], nn.Conv2d):  # (B, C, H, W): features are C
                        g = g.movedim(1, -1)
                    flat = real.keep(g).reshape(-1, g.shape[-1]).double()  # (tokens, N)
                    sums[name] = sums.get(name, 0) + flat.pow(2).sum(dim=0)
                    tokens[name] += flat.shape[0]
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    missing = [n for n in names if tokens[n] == 0]
    if missing:
        raise ValueError(f"layer {missing[0]!r} saw no calibration inputs")
    return {n: (sums[n] / tokens[n]).float() for n in names}


def measure_candidates(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantize: Quantizer,
    bit_choices: Sequence[int],
    group_size: int | None,
    calibration: Sequence[Batch] | None,
    *,
    progress: bool = False,
) -> Candidates:
    """Sensitivity and size of every layer at every width; ``model`` is left unchanged.

    With calibration data: one forward/backward pass for the output gains ``G``
    (:func:`output_gains`), then the layers' inputs block by block on the unquantized model
    for ``A`` (one block's Hessians alive at a time, as in GPTQ). Without: ``‖ΔW‖²``.
    """
    errors: dict[str, dict[int, float]] = {}
    sizes: dict[str, dict[int, int]] = {}

    def measure(
        name: str, module: nn.Module, hessian: torch.Tensor | None, gain: torch.Tensor | None
    ) -> None:
        errors[name], sizes[name] = layer_candidates(
            linear_weight(module), quantize, bit_choices, group_size, hessian, gain
        )

    if not calibration:
        for name, module in tqdm(layers.items(), desc="sensitivity", disable=not progress,
                                 leave=False):  # fmt: skip
            measure(name, module, None, None)
        return Candidates(errors, sizes, weighted=False)

    gains = output_gains(model, layers, calibration)

    def make(_name: str, module: nn.Module) -> InputStats:
        return InputStats(linear_weight(module).shape[1], hessian=True)

    def record(group: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
        for name, module in group.items():
            measure(name, module, stats[name].hessian / 2.0, gains[name])  # A = X Xᵀ / n

    sequential_layers(model, list(layers), calibration, make, record, progress=progress,
                      desc="sensitivity", share_inputs=True)  # fmt: skip
    return Candidates({n: errors[n] for n in layers}, {n: sizes[n] for n in layers}, True)
