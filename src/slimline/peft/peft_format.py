"""LoRA adapters on disk in the ``peft`` package's layout, both ways.

A directory holds ``adapter_config.json`` (``peft_type: LORA``, rank, alpha, the exact module
names as ``target_modules``...) and ``adapter_model.safetensors`` with peft's key names,
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (+ ``lora_magnitude_vector``
for DoRA), so ``peft.PeftModel.from_pretrained(base, directory)`` rebuilds the same model.
Only the adapters are written, never the base weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimline.core.targets import is_conv1d
from slimline.peft.layer import LoraLinear, base_shape
from slimline.peft.lora import LoraConfig, adaptable, add_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix: PeftModel.base_model (LoraModel).model


def adapters_of(model: nn.Module) -> dict[str, LoraLinear]:
    """Every :class:`LoraLinear` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_config(model: nn.Module, adapters: dict[str, LoraLinear]) -> dict[str, Any]:
    """peft's ``LoraConfig`` fields for ``adapters`` (which must share r, alpha, variant...)."""
    shapes = {(a.r, a.alpha, a.dora, a.rslora, a.dropout_p) for a in adapters.values()}
    if len(shapes) != 1:
        raise ValueError("save_adapter: the adapters differ in r / alpha / variant / rslora / "
                         "dropout; peft's format holds one setting per directory")  # fmt: skip
    r, alpha, dora, rslora, dropout = shapes.pop()
    masked = sorted(n for n, a in adapters.items() if a.weight_mask is not None)
    if masked:
        raise ValueError(f"save_adapter: {masked[0]!r} carries a weight mask (a pruned "
                         "base), which peft's format cannot express; merge the adapters "
                         "instead")  # fmt: skip
    conv1d = [is_conv1d(a.base_layer) for a in adapters.values()]
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(adapters),  # exact names: peft matches ``key == target``
        "use_dora": dora,
        "use_rslora": rslora,
        "fan_in_fan_out": all(conv1d),  # GPT-2's Conv1D stores its weight (in, out)
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s LoRA adapters as a peft adapter directory; returns its path.

    ``PeftModel.from_pretrained(base, directory)`` on the same base model (without
    adapters) then computes what ``model`` computes. ValueError when there are no adapters.
    """
    from safetensors.torch import save_file

    adapters = adapters_of(model)
    if not adapters:
        raise ValueError("save_adapter: the model has no LoRA adapters (was it merged?)")
    config = adapter_config(model, adapters)
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        key = f"{PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = adapter.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = adapter.lora_B.weight.detach().cpu().contiguous()
        if adapter.lora_magnitude_vector is not None:
            magnitude = adapter.lora_magnitude_vector.detach().cpu().contiguous()
            tensors[f"{key}.lora_magnitude_vector"] = magnitude
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


# Options of peft's LoraConfig this reader does not implement: refused, never ignored.
_UNSUPPORTED: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
                "layers_to_transform": None, "bias": "none", "lora_bias": False,
                "use_qalora": False, "target_parameters": None}  # fmt: skip


def load_adapter(model: nn.Module, directory: str | Path) -> dict[str, LoraLinear]:
    """Add the LoRA adapters of a peft adapter directory to ``model`` in place.

    The inverse of :func:`save_adapter`, also for directories ``peft`` wrote: plain LoRA,
    DoRA and rsLoRA with one rank for all layers. Everything is read and checked (options,
    module names, tensor shapes) before ``model`` changes; ValueError naming the file else.
    """
    path = Path(directory)
    config, cfg = _read_config(path / CONFIG_FILE)
    chosen = [(n, m) for n, m in model.named_modules() if n and _targeted(n, config)]
    if not chosen:
        raise ValueError(f"load_adapter: target_modules {config['target_modules']!r} match no "
                         "module of the model")  # fmt: skip
    for name, module in chosen:
        if not adaptable(module):
            raise ValueError(f"load_adapter: target_modules match {name!r}, a "
                             f"{type(module).__name__}, which LoRA cannot adapt")  # fmt: skip
    tensors = _read_weights(path / WEIGHTS_FILE)
    expected = _expected_tensors(chosen, cfg)
    if set(tensors) != set(expected):
        odd = sorted(set(tensors) ^ set(expected))
        raise ValueError(f"load_adapter: {path / WEIGHTS_FILE}: tensors do not fit the model, "
                         f"e.g. {odd[0]!r}")  # fmt: skip
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"load_adapter: {path / WEIGHTS_FILE}: {key!r} has shape "
                             f"{tuple(tensors[key].shape)}, expected {shape}")  # fmt: skip
    adapters = add_adapters(model, cfg, chosen, freeze=False)
    with torch.no_grad():
        for name, adapter in adapters.items():
            for param_name, param in adapter.named_parameters():
                if not param_name.startswith("base_layer."):
                    param.copy_(tensors[_file_key(name, param_name)])
    return adapters


def _read_config(file: Path) -> tuple[dict[str, Any], LoraConfig]:
    """The JSON of ``adapter_config.json`` and the adapter settings it holds; ValueError
    naming the file (and the key) for a missing, unreadable or unsupported config."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_adapter: cannot read {file}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {file} holds a {type(config).__name__}, not an object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {file} is not a LoRA adapter "
                         f"(peft_type {config.get('peft_type')!r})")  # fmt: skip
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}):
            raise ValueError(f"load_adapter: {file}: {key}={config[key]!r} is not supported")
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else targets
    if not (isinstance(names, list) and all(isinstance(t, str) for t in names)):
        raise ValueError(f"load_adapter: {file}: target_modules must be a string or a list of "
                         f"strings, got {targets!r}")  # fmt: skip
    values: dict[str, Any] = {}
    for key, field_name, kind in (("r", "r", int), ("lora_alpha", "alpha", float),
                                  ("lora_dropout", "dropout", float)):  # fmt: skip
        value = config.get(key, 0.0 if key == "lora_dropout" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()
        ):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"load_adapter: {file}: {key} must be {what}, got {value!r}")
        values[field_name] = kind(value)
    try:
        cfg = LoraConfig(**values, variant="dora" if config.get("use_dora") else "lora",
                         rslora=bool(config.get("use_rslora")))  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"load_adapter: {file}: {exc}") from None
    return config, cfg


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``; ValueError naming the file else."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise ValueError(f"load_adapter: {file} is missing")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad file
        raise ValueError(f"load_adapter: cannot read {file}: {exc}") from None


def _targeted(name: str, config: dict[str, Any]) -> bool:
    """peft's rule: a regex string fully matches the name; a list entry equals it or is a
    dotted suffix of it."""
    import re

    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets or ())


def _expected_tensors(
    chosen: list[tuple[str, nn.Module]], cfg: LoraConfig
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in chosen:
        n_out, n_in = base_shape(module)
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (cfg.r, n_in)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (n_out, cfg.r)
        if cfg.variant == "dora":
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (n_out,)
    return shapes


def _file_key(name: str, param_name: str) -> str:
    return f"{PREFIX}{name}.{param_name}"
