"""What a checkpoint directory must hold before ``sl.load`` builds anything from it.

``sl.load`` reads files a user hands it, possibly truncated by a full disk, edited by hand or
written by another version. Every check here runs before a tensor is assigned, so a broken
checkpoint is refused with a ``ValueError`` naming the file (and the tensor), and never leaves
a half-loaded model behind:

* ``recipe.json`` must be valid JSON with the manifest's keys of the right types, and its
  recipe must validate as a :class:`~slimline.core.recipe.Recipe`;
* ``model.safetensors`` must have a readable header that covers the whole file (safetensors
  checks the byte ranges when the file is opened, without reading the data);
* the tensors it lists (with sparse ones as their mask + values pair) must be exactly those of
  the rebuilt model's ``state_dict`` — compressed layers rebuilt from their metadata first —
  with the same shapes and dtypes. The one freedom: a floating tensor may be stored in another
  float width (fp16 / bf16 / fp32 / fp64), as a ``half`` step or a bf16 source model leaves
  it; integer, bool and fp8 tensors (packed codes, masks) must match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from slimline.core import sparse_storage

Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one tensor

# safetensors' names for the dtypes torch can hold (the header's "dtype" field).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_FLOAT_WIDTHS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ARCHITECTURE_KINDS = ("huggingface", "registered", "user")


# --- recipe.json --------------------------------------------------------------------------


def check_manifest(data: object, where: Path) -> dict[str, Any]:
    """``data`` (parsed ``recipe.json``) with defaults filled in; ValueError naming ``where``."""
    if not isinstance(data, dict):
        _bad(where, f"expected a JSON object, got {type(data).__name__}")
    _check_recipe(data.get("recipe"), where)
    _check_architecture(data.get("architecture"), where)
    modules = _mapping(data.get("modules", {}), "modules", where)
    for name, entry in modules.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) \
                or not isinstance(entry.get("meta"), dict):
            _bad(where, f"modules[{name!r}] must be {{'type': str, 'meta': object}}")
    aliases = _mapping(data.get("aliases", {}), "aliases", where)
    if not all(isinstance(v, str) for v in aliases.values()):
        _bad(where, "aliases must map tensor names to tensor names")
    sparse = _mapping(data.get("sparse", {}), "sparse", where)
    for name, shape in sparse.items():
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            _bad(where, f"sparse[{name!r}] must be a shape (a list of sizes), got {shape!r}")
    if data.get("source") is not None and not isinstance(data["source"], str):
        _bad(where, f"source must be a string, got {data['source']!r}")
    reports = data.get("reports", [])  # absent in checkpoints written before it was recorded
    if not isinstance(reports, list) or not all(isinstance(r, dict) for r in reports):
        _bad(where, "reports must be a list of JSON objects (one per applied step)")
    return {**data, "modules": modules, "aliases": aliases, "sparse": sparse, "reports": reports}


def _check_recipe(recipe: object, where: Path) -> None:
    from slimline.core.recipe import Recipe

    if not isinstance(recipe, dict):
        _bad(where, "recipe must be a JSON object")
    try:
        Recipe.from_dict(recipe)
    except (TypeError, ValueError) as exc:
        _bad(where, f"its recipe is invalid: {exc}")


def _check_architecture(arch: object, where: Path) -> None:
    if not isinstance(arch, dict) or arch.get("kind") not in _ARCHITECTURE_KINDS \
            or not isinstance(arch.get("class"), str):
        _bad(where, f"architecture must be {{'kind': one of {list(_ARCHITECTURE_KINDS)}, "
                    "'class': str}")
    if arch["kind"] == "registered" and not isinstance(arch.get("kwargs"), dict):
        _bad(where, "architecture.kwargs must be a JSON object")


def _mapping(value: object, key: str, where: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        _bad(where, f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(where: Path, problem: str) -> NoReturn:
    raise ValueError(f"load: {where}: {problem}")


# --- model.safetensors ----------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Spec]:
    """``{name: (shape, dtype)}`` from the header of a safetensors file, data not read."""
    from safetensors import SafetensorError, safe_open

    specs: dict[str, Spec] = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                part = file.get_slice(name)
                specs[name] = (tuple(part.get_shape()), _dtype(part.get_dtype(), path, name))
    except SafetensorError as exc:
        _bad(path, f"not a readable safetensors file (truncated or corrupt?): {exc}")
    return specs


def _dtype(name: str, path: Path, tensor: str) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        _bad(path, f"tensor {tensor!r} has unsupported dtype {name}")
    return SAFETENSORS_DTYPES[name]


def expected_state(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, Spec]:
    """``{name: (shape, dtype)}`` of ``model``'s state with ``replacements`` swapped in.

    Read without installing the replacements, so a model passed in is untouched until the
    checkpoint is known to fit it.
    """
    replaced = tuple(f"{name}." for name in replacements)
    specs = {k: _spec(t) for k, t in model.state_dict().items()
             if isinstance(t, torch.Tensor) and not k.startswith(replaced)}
    for name, module in replacements.items():
        specs.update({f"{name}.{k}": _spec(t) for k, t in module.state_dict().items()
                      if isinstance(t, torch.Tensor)})
    return specs


def _spec(tensor: torch.Tensor) -> Spec:
    return tuple(tensor.shape), tensor.dtype


def check_tensors(
    path: Path,
    header: Mapping[str, Spec],
    expected: Mapping[str, Spec],
    *,
    aliases: Mapping[str, str],
    sparse: Mapping[str, list[int]],
) -> None:
    """Raise a ValueError naming ``path`` and the tensor unless the file fits ``expected``."""
    stored = _logical(path, header, sparse)
    for alias, source in aliases.items():
        if alias not in expected:
            _bad(path, f"tensor {alias!r} is recorded as shared, but the model has no such tensor")
        if source not in stored:
            _bad(path, f"tensor {source!r} (shared with {alias!r}) is missing")
        _check_spec(path, alias, stored[source], expected[alias])
    missing = sorted(set(expected) - set(stored) - set(aliases))
    if missing:
        _bad(path, f"tensor {missing[0]!r} is missing ({len(missing)} of the model's "
                   f"{len(expected)} tensors are)")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        _bad(path, f"holds tensor {unexpected[0]!r}, which the model does not have "
                   f"({len(unexpected)} such)")
    for name, spec in stored.items():
        _check_spec(path, name, spec, expected[name])


def _logical(path: Path, header: Mapping[str, Spec], sparse: Mapping[str, list[int]]
             ) -> dict[str, Spec]:
    """The header's tensors, a sparse pair (mask + values) counted as the tensor it encodes."""
    specs = dict(header)
    for name, shape in sparse.items():
        mask = specs.pop(name + sparse_storage.MASK_SUFFIX, None)
        values = specs.pop(name + sparse_storage.VALUES_SUFFIX, None)
        if mask is None or values is None:
            _bad(path, f"sparse tensor {name!r} lacks its mask or values")
        numel = math.prod(shape)
        if mask != (((numel + 7) // 8,), torch.uint8):
            _bad(path, f"sparse tensor {name!r}: mask {_show(mask)} does not cover "
                       f"{numel} values (expected [{(numel + 7) // 8}] uint8)")
        if len(values[0]) != 1 or values[0][0] > numel:
            _bad(path, f"sparse tensor {name!r}: values of shape {list(values[0])} "
                       f"cannot fill shape {shape}")
        specs[name] = (tuple(shape), values[1])
    return specs


def _check_spec(path: Path, name: str, stored: Spec, expected: Spec) -> None:
    if stored[0] != expected[0]:
        _bad(path, f"tensor {name!r} has shape {list(stored[0])}, the model expects "
                   f"{list(expected[0])}")
    if not dtype_fits(stored[1], expected[1]):
        _bad(path, f"tensor {name!r} has dtype {_name(stored[1])}, the model expects "
                   f"{_name(expected[1])}")


def dtype_fits(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Same dtype, or both plain float widths (a cast changes widths, not the model)."""
    return stored == expected or (stored in _FLOAT_WIDTHS and expected in _FLOAT_WIDTHS)


def _show(spec: Spec) -> str:
    return f"{list(spec[0])} {_name(spec[1])}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
