"""Surgery: physically remove units from layers by building new, smaller layers.

The ``slice_*`` helpers take a layer and the indices to keep and return a *new* layer holding
copies of the kept slices (the original is not modified); :func:`prune_group` swaps them into
the model. :func:`refit_consumer` repairs, by least squares, the layer whose inputs lose
features. Nothing here decides which units go (importance, in ``structured.py``) or which
tensors move together (coupling, in ``groups.py``): the three concerns are kept apart as in
Torch-Pruning (DepGraph, arXiv 2301.12900).

Axes: ``"out"`` slices a layer's outputs (Linear rows, Conv2d output channels, the bias, a
BatchNorm's channels); ``"in"`` slices its inputs (Linear columns, Conv2d input channels).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from slimline.core.modules import register_module

Axis = Literal["out", "in"]


def unit_features(units: torch.Tensor, width: int) -> torch.Tensor:
    """Feature indices of whole units: unit ``u`` covers features ``[u·width, (u+1)·width)``.

    ``units`` (k,) → (k·width,), in unit order; e.g. heads of ``head_dim`` rows each.
    """
    offsets = torch.arange(width, device=units.device)  # (width,)
    return (units.long().unsqueeze(1) * width + offsets).flatten()  # (k·width,)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of a Linear / Conv2d / BatchNorm; TypeError if it has none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _kept(param: torch.Tensor, dim: int, keep: torch.Tensor | None) -> nn.Parameter:
    data = param.detach() if keep is None else param.detach().index_select(dim, keep)
    return nn.Parameter(data.clone(), requires_grad=param.requires_grad)


@register_module
class SlicedLinear(nn.Linear):
    """An ``nn.Linear`` whose shape the model's config cannot describe (pruned BERT heads).

    transformers derives BERT's head size from ``hidden_size / num_attention_heads``, so a
    config cannot say "6 heads of 32"; this class records its own shape in the checkpoint
    manifest (``core/modules.py``), and ``sl.load`` rebuilds it at that shape.
    """

    def slimline_meta(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> SlicedLinear:
        # Built on the meta device: load_state_dict(assign=True) supplies every tensor.
        return cls(
            int(meta["in_features"]), int(meta["out_features"]),
            bias=bool(meta["bias"]), device="meta",
        )


def slice_linear(
    linear: nn.Linear,
    keep_out: torch.Tensor | None = None,
    keep_in: torch.Tensor | None = None,
    *,
    cls: type[nn.Linear] = nn.Linear,
) -> nn.Linear:
    """A new Linear with rows ``keep_out`` and columns ``keep_in`` of ``linear`` (None: all).

    weight (out, in) → (len(keep_out), len(keep_in)); bias (out,) → (len(keep_out),).
    """
    weight = _kept(linear.weight, 0, keep_out)
    weight = _kept(weight, 1, keep_in)
    out_features, in_features = weight.shape
    new = cls(in_features, out_features, bias=linear.bias is not None, device="meta")
    new.weight = weight
    if linear.bias is not None:
        new.bias = _kept(linear.bias, 0, keep_out)
    return new.train(linear.training)


def slice_conv2d(
    conv: nn.Conv2d, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None
) -> nn.Conv2d:
    """A new Conv2d with output channels ``keep_out`` and input channels ``keep_in``.

    weight (C_out, C_in, kh, kw) → (len(keep_out), len(keep_in), kh, kw). Grouped
    convolutions couple input and output channels, so only ``groups == 1`` is handled.
    """
    if conv.groups != 1:
        raise ValueError(f"slice_conv2d: grouped convolution (groups={conv.groups}) is not handled")
    weight = _kept(_kept(conv.weight, 0, keep_out), 1, keep_in)
    padding: Any = conv.padding
    new = nn.Conv2d(
        weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
        padding=padding, dilation=conv.dilation, bias=conv.bias is not None,  # type: ignore[arg-type]
        padding_mode=conv.padding_mode, device="meta",
    )
    new.weight = weight
    if conv.bias is not None:
        new.bias = _kept(conv.bias, 0, keep_out)
    return new.train(conv.training)


def slice_batchnorm(norm: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    """A new BatchNorm of the same class keeping channels ``keep`` (affine and running stats)."""
    new = type(norm)(
        len(keep), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    if norm.affine:
        new.weight = _kept(norm.weight, 0, keep)
        new.bias = _kept(norm.bias, 0, keep)
    for name in ("running_mean", "running_var"):
        stat = getattr(norm, name)
        if stat is not None:
            setattr(new, name, stat.detach().index_select(0, keep).clone())
    if norm.num_batches_tracked is not None:
        new.num_batches_tracked = norm.num_batches_tracked.clone()
    return new.train(norm.training)


def slice_layer(
    module: nn.Module, axis: Axis, keep: torch.Tensor, *, record_shape: bool
) -> nn.Module:
    """Slice ``module`` along ``axis``; ``record_shape``: return a :class:`SlicedLinear`.

    Raises ValueError naming the layer class for kinds it cannot slice (never skips).
    """
    if isinstance(module, nn.Linear):
        keeps_shape = record_shape or isinstance(module, SlicedLinear)
        cls: type[nn.Linear] = SlicedLinear if keeps_shape else nn.Linear
        kwargs = {"keep_out": keep} if axis == "out" else {"keep_in": keep}
        return slice_linear(module, **kwargs, cls=cls)
    if isinstance(module, nn.Conv2d):
        if axis == "out":
            return slice_conv2d(module, keep_out=keep)
        return slice_conv2d(module, keep_in=keep)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and axis == "out":
        return slice_batchnorm(module, keep)
    raise ValueError(f"surgery: cannot slice a {type(module).__name__} along its {axis!r} axis")


# (module name, axis, features per unit, record shape, offset of the units' run)
SliceSpec = tuple[str, Axis, int, bool, int]


def kept_features(
    size: int, runs: list[tuple[int, int]], keep_units: torch.Tensor, n_units: int
) -> torch.Tensor:
    """Feature indices a layer keeps, ascending, when ``keep_units`` of ``n_units`` stay.

    ``runs``: ``(offset, width)`` of each run of units in the layer's ``size`` features —
    unit ``u`` owns ``[offset + u·width, offset + (u+1)·width)`` of each run. One run at
    offset 0 is a plain layer; several are a fused one (Phi-3's ``qkv_proj`` holds a query,
    a key and a value run). Features outside every run are kept.
    """
    outside = torch.ones(size, dtype=torch.bool, device=keep_units.device)
    kept = []
    for offset, width in runs:
        if offset < 0 or offset + n_units * width > size:
            raise ValueError(f"surgery: a run of {n_units}×{width} at {offset} exceeds {size}")
        outside[offset : offset + n_units * width] = False
        kept.append(offset + unit_features(keep_units, width))
    return torch.cat([outside.nonzero().flatten(), *kept]).sort().values


def prune_group(
    model: nn.Module, slices: list[SliceSpec], keep_units: torch.Tensor, n_units: int
) -> list[str]:
    """Keep only ``keep_units`` (of ``n_units``) in every tensor of one coupled group;
    returns the names changed.

    Each slice is ``(module name, axis, width, record_shape, offset)``: the unit ``u`` owns
    features ``[offset + u·width, offset + (u+1)·width)`` of that module along ``axis``; the
    slices naming one module (a fused projection) are cut together (:func:`kept_features`).
    """
    runs: dict[tuple[str, Axis], list[tuple[int, int]]] = {}
    record: dict[tuple[str, Axis], bool] = {}
    for name, axis, width, record_shape, offset in slices:
        runs.setdefault((name, axis), []).append((offset, width))
        record[(name, axis)] = record.get((name, axis), False) or record_shape
    changed: list[str] = []
    for (name, axis), layer_runs in runs.items():
        module = model.get_submodule(name)
        size = layer_weight(module).shape[0 if axis == "out" else 1]
        keep = kept_features(size, layer_runs, keep_units.to(_device(module)), n_units)
        sliced = slice_layer(module, axis, keep, record_shape=record[(name, axis)])
        model.set_submodule(name, sliced)
        changed += [] if name in changed else [name]
    return changed


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def refit_consumer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    xxt: torch.Tensor,
    keep: torch.Tensor,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares repair of a layer whose input features outside ``keep`` are removed.

    Minimises Σ_tokens ‖W x + b − W' x_K − b'‖² over the kept columns W' and the bias b', as
    retraining-free structured pruning does (Kwon et al., arXiv 2204.09656 §4.3; FLAP, arXiv
    2312.11983, is the bias-only special case). Solution, with D the removed features and
    H = Σ x̃ x̃ᵀ over inputs x̃ = [x; 1] (the 1 carries the bias):

        [W' b'] = [W_K b] + W_D H_DK (H_KK + λI)⁻¹,   λ = dampening · mean(diag H_KK)

    so removed features that are always zero leave the layer exactly as it was.
    ``weight`` (out, in), ``bias`` (out,) or None, ``xxt`` (in+1, in+1), ``keep`` (k,) →
    (out, k) weight and (out,) bias (None if the layer has none).
    """
    n_in, keep = weight.shape[1], keep.to(weight.device)
    mask = torch.ones(n_in, dtype=torch.bool, device=weight.device)
    mask[keep] = False
    dropped = mask.nonzero().flatten()  # D
    kept = keep if bias is None else torch.cat([keep, keep.new_tensor([n_in])])  # K (+ the 1)
    h = xxt.to(device=weight.device, dtype=torch.float64)
    h_kk = h[kept][:, kept]  # (|K|, |K|)
    h_kk = h_kk + torch.eye(len(kept), dtype=h.dtype, device=h.device) * (
        dampening * h_kk.diagonal().mean().clamp_min(1e-12)
    )
    w_d = weight.detach().double().index_select(1, dropped)  # (out, |D|)
    correction = torch.linalg.solve(h_kk, (w_d @ h[dropped][:, kept]).T).T  # (out, |K|)
    base = weight.detach().double()[:, keep]
    if bias is None:
        return (base + correction).to(weight.dtype), None
    new_bias = bias.detach().double() + correction[:, -1]
    return (base + correction[:, :-1]).to(weight.dtype), new_bias.to(bias.dtype)


def refit_linear_(layer: nn.Linear, keep: torch.Tensor, xxt: torch.Tensor) -> None:
    """In place: :func:`refit_consumer` on ``layer``, keeping input features ``keep`` (k,);
    the other columns become zero, for :func:`prune_group` to cut."""
    weight, bias = refit_consumer(layer.weight, layer.bias, xxt, keep)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, keep.to(layer.weight.device)] = weight
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
