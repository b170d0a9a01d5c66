"""Mixed precision: a bit width per layer, from measured sensitivity, under a size budget.

HAWQ (Dong et al., arXiv 1905.03696) ranks layers by the curvature of the loss and gives the
sensitive ones more bits; HAWQ-V3 (Yao et al., arXiv 2011.10680) states the choice as an
integer program — minimise the summed sensitivity subject to a model-size budget — and solves
it exactly. slimline does the same for the weight-only quantizers ``rtn``, ``gptq``, ``hqq``:

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
  the bias is left out, being the same at every width. A budget of ``average_bits`` is then
  *stored* bits per weight, comparable with uniform 4-bit g128 at 4 + 16/128 = 4.125.
* **allocation**: ``min Σ e_l(b_l)  s.t.  Σ s_l(b_l) ≤ average_bits · Σ N_l K_l``, a
  multiple-choice knapsack, solved by :func:`allocate_bits` (dynamic programming over sizes
  rounded up to a grid, then a greedy fill of the slack the rounding left).

Cost: with calibration data, one forward and backward pass over it (the whole model's
activations for one batch are alive, unlike the block-by-block passes of GPTQ), then one
block-by-block pass for ``A``; each layer is quantized once per width (for ``gptq``, one GPTQ
solve per width). Layers must be differentiable with respect to their inputs for ``G``.
"""

from __future__ import annotations

import math
from collections import Counter
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

# The dynamic programme's table: at most this many states per layer (float64 vectors of
# 32 MiB) and this many (layer, state) choices in all (int8, 64 MiB). A 7B Llama's 224 layers
# get 300k states: rounding then costs at most 0.07% of the budget (see allocate_bits).
_MAX_UNITS = 1 << 22
_MAX_CELLS = 1 << 26


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


def allocate_bits(
    errors: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, Mapping[int, int]],
    budget_bits: int,
    *,
    max_units: int = _MAX_UNITS,
    max_cells: int = _MAX_CELLS,
) -> dict[str, int]:
    """The width per layer minimising ``Σ errors[l][b]`` with ``Σ sizes[l][b] ≤ budget_bits``.

    ``errors[l][b]`` is layer l's sensitivity at b bits, ``sizes[l][b]`` its stored bits
    (positive integers); each layer offers the same widths in both maps.

    A dynamic programme over the budget spent, in units of ``u`` bits. When every size is a
    multiple of a ``u`` that leaves at most ``min(max_units, max_cells / L)`` units in the
    budget — usual for real layers, whose sizes share large powers of two — the answer is
    the exact optimum. Otherwise sizes are rounded *up* to the smallest ``u`` that does: the
    answer still fits the budget, and its error is at most that of the best allocation under
    ``budget_bits − L·u`` (every such allocation fits the rounded problem), which is within
    ``L² / max_cells`` of the budget (0.07% for 224 layers); the slack rounding leaves is
    then filled greedily with exact sizes. Raises ValueError when even the cheapest width of
    every layer exceeds the budget.
    """
    names = _check_problem(errors, sizes)
    cheapest = sum(min(sizes[n].values()) for n in names)
    if cheapest > budget_bits:
        raise ValueError(f"budget of {budget_bits} bits is below the cheapest layout, {cheapest}")
    states = max(1, min(max_units, max_cells // len(names)))
    common = math.gcd(*(size for n in names for size in sizes[n].values()))
    unit = common if budget_bits // common <= states else math.ceil(budget_bits / states)
    widths = _knapsack(names, errors, sizes, budget_bits // unit, unit)
    if widths is None:  # rounding up made every allocation too dear: start from the cheapest
        widths = {n: min(sizes[n], key=sizes[n].__getitem__) for n in names}
    return _fill_greedily(widths, errors, sizes, budget_bits)


def _check_problem(
    errors: Mapping[str, Mapping[int, float]], sizes: Mapping[str, Mapping[int, int]]
) -> list[str]:
    if set(errors) != set(sizes) or not errors:
        raise ValueError("errors and sizes must describe the same, non-empty set of layers")
    for name in errors:
        if not errors[name] or set(errors[name]) != set(sizes[name]):
            raise ValueError(f"layer {name!r}: errors and sizes must offer the same widths")
        if not all(math.isfinite(e) and e >= 0 for e in errors[name].values()):
            raise ValueError(f"layer {name!r}: errors must be finite and ≥ 0")
        if not all(isinstance(s, int) and s > 0 for s in sizes[name].values()):
            raise ValueError(f"layer {name!r}: sizes must be positive integers (bits)")
    return list(errors)


def _knapsack(
    names: list[str],
    errors: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, Mapping[int, int]],
    units: int,
    unit: int,
) -> dict[str, int] | None:
    """Multiple-choice knapsack by DP over units used (sizes rounded up); None if none fits."""
    best = torch.full((units + 1,), math.inf, dtype=torch.float64)  # least error per units used
    best[0] = 0.0
    picks = torch.zeros(len(names), units + 1, dtype=torch.int8)  # the choice behind each state
    options = {n: sorted(errors[n]) for n in names}
    for i, name in enumerate(names):
        after = torch.full_like(best, math.inf)
        for j, b in enumerate(options[name]):
            cost = math.ceil(sizes[name][b] / unit)
            if cost > units:
                continue
            tried = best[: units + 1 - cost] + errors[name][b]  # states cost..units
            better = tried < after[cost:]
            after[cost:] = torch.where(better, tried, after[cost:])
            picks[i, cost:][better] = j
        best = after
    if not math.isfinite(float(best.min())):
        return None
    used = int(torch.argmin(best))
    widths = {}
    for i in reversed(range(len(names))):
        name = names[i]
        b = options[name][int(picks[i, used])]
        widths[name] = b
        used -= math.ceil(sizes[name][b] / unit)
    return widths


def _fill_greedily(
    widths: dict[str, int],
    errors: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, Mapping[int, int]],
    budget_bits: int,
) -> dict[str, int]:
    """Spend what is left of the budget: take the change that cuts error most, while one fits."""
    widths = dict(widths)
    left = budget_bits - sum(sizes[n][b] for n, b in widths.items())
    while True:
        gain, move = 0.0, None
        for name, current in widths.items():
            for b, err in errors[name].items():
                extra = sizes[name][b] - sizes[name][current]
                if extra <= left and errors[name][current] - err > gain:
                    gain, move = errors[name][current] - err, (name, b, extra)
        if move is None:
            return widths
        name, b, extra = move
        widths[name] = b
        left -= extra


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


def _probe_loss(output: object, batch: Batch, draws: _ProbeDraws) -> torch.Tensor:
    """A loss whose gradients' expected outer product is the curvature of the output cost.

    Logits: cross-entropy to labels drawn from the model's own softmax — its expected
    gradient outer product is the Fisher, the Hessian of the KL divergence at the model.
    Padding tokens get no label. Other outputs: ``⟨output, v⟩`` with v ~ N(0, I) —
    ``E[g gᵀ] = JᵀJ``, the Gauss–Newton matrix of ½‖Δoutput‖².
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        real = RealTokens()
        real.mask = token_mask(batch)
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
    at each of its output features (see :func:`_probe_loss`); the model is left unchanged."""
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
                loss = _probe_loss(forward(model, batch), batch, draws)
                seen = [(n, out) for n in names for out in outputs[n] if out.requires_grad]
                if not loss.requires_grad or not seen:
                    raise ValueError("mixed precision needs gradients at the layers' outputs, "
                                     "but the model's forward runs without autograd")
                grads = torch.autograd.grad(loss, [out for _, out in seen], allow_unused=True)
                for (name, out), grad in zip(seen, grads, strict=True):
                    g = torch.zeros_like(out) if grad is None else grad.detach()
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

    sequential_layers(model, dict(layers), calibration, make, record, progress=progress,
                      desc="sensitivity")  # fmt: skip
    return Candidates({n: errors[n] for n in layers}, {n: sizes[n] for n in layers}, True)


@dataclass(frozen=True)
class BitPlan:
    """The chosen width per layer and what it costs, in stored bits."""

    widths: dict[str, int]
    stored: int  # bits of codes, scales and zero points, as planned
    weights: int  # Σ N·K over the layers
    average_bits: float  # the budget, stored bits per weight
    weighted: bool

    def describe(self, realised_bits: int | None = None) -> str:
        """E.g. ``mixed precision 3b×5, 4b×12, 8b×2: 4.23 stored bits/weight (budget 4.25)``."""
        counts = Counter(self.widths.values())
        mix = ", ".join(f"{b}b×{counts[b]}" for b in sorted(counts))
        spent = self.stored if realised_bits is None else realised_bits
        how = "K-FAC output cost (calibration data)" if self.weighted else "‖ΔW‖² (no data)"
        return (
            f"mixed precision {mix}: {spent / self.weights:.3f} stored bits/weight "
            f"(budget {self.average_bits:g}); sensitivity: {how}"
        )


def plan_bits(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantize: Quantizer,
    *,
    average_bits: float,
    bit_choices: Sequence[int],
    group_size: int | None,
    calibration: Sequence[Batch] | None,
    step: str,
    progress: bool = False,
) -> BitPlan:
    """Measure every layer at every width and choose widths within ``average_bits``.

    ``step`` names the recipe step in the ValueError raised when the budget is below what
    the layers can take (their cheapest widths with their real scales), before any change.
    """
    found = measure_candidates(
        model, layers, quantize, bit_choices, group_size, calibration, progress=progress
    )
    weights = sum(linear_weight(m).numel() for m in layers.values())
    budget = math.floor(average_bits * weights)
    cheapest = sum(min(s.values()) for s in found.sizes.values())
    if cheapest > budget:
        raise ValueError(
            f"{step}.average_bits: {average_bits:g} is below the {cheapest / weights:.4f} stored "
            f"bits per weight of these layers at {min(bit_choices)} bits"
        )
    widths = allocate_bits(found.errors, found.sizes, budget)
    stored = sum(found.sizes[n][b] for n, b in widths.items())
    return BitPlan(widths, stored, weights, average_bits, found.weighted)


def layer_stored_bits(layer: nn.Module) -> int:
    """Bits a packed layer stores for its weight: ``qweight``, ``scales`` and ``zeros``."""
    total = 0
    for name in ("qweight", "scales", "zeros"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    return 8 * total
