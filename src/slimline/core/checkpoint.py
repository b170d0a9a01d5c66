"""Save and load models, compressed or not, as safetensors + JSON (never pickle).

A checkpoint is a directory:

* ``model.safetensors`` — every tensor as stored (packed int4 stays packed); a tensor shared
  under several names (tied embeddings) is written once;
* ``recipe.json`` — the recipe applied, how to rebuild the architecture, which modules were
  replaced by which registered compressed class (with its JSON metadata), the shared-tensor
  aliases, and the steps to re-apply at load (``compile`` cannot be stored);
* ``config.json`` (+ tokenizer files) for Hugging Face models, marked so that transformers
  without slimline refuses a compressed one (``export/hf_config.py``); the source directory's
  tokenizer, generation and sentence-transformers files (``export/source_files.py``);
* ``README.md``, the model card: recipe, what each step did, how to load
  (``export/model_card.py``).

Writes go to a temporary sibling directory that is renamed over the target at the end, so an
interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimline.core import checkpoint_checks as checks
from slimline.core import sparse_storage
from slimline.core.modules import is_registered_module, module_type

CHECKPOINT_FORMAT = "slimline-checkpoint"
CHECKPOINT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_ATTR = "slimline_recipe"  # the applied recipe dict, kept on the compressed model
SOURCE_ATTR = "slimline_source"  # the built-in model a checkpoint came from, if any
SOURCE_DIR_ATTR = "slimline_source_dir"  # the local directory the model was read from, if any
REPORTS_ATTR = "slimline_step_reports"  # per applied step: method, layers, seconds, notes

_ARCHITECTURES: dict[str, type[nn.Module]] = {}


def register_architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """Allow a plain ``nn.Module`` class with ``slimline_init_kwargs()`` to be rebuilt."""
    if not hasattr(cls, "slimline_init_kwargs"):
        raise TypeError(f"{cls.__name__} lacks slimline_init_kwargs()")
    _ARCHITECTURES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def applied_recipe(model: nn.Module) -> dict[str, Any]:
    """The recipe dict recorded on ``model`` by ``compress`` (empty recipe if none)."""
    recipe = getattr(model, RECIPE_ATTR, None)
    return recipe if isinstance(recipe, dict) else {"version": 1, "steps": []}


def record_reports(model: nn.Module, reports: list[dict[str, Any]]) -> None:
    """Append ``compress``'s step reports to ``model``'s record (layer lists as counts)."""
    kept = [{"method": r["method"], "modules": len(r["modules"]), "seconds": r["seconds"],
             "notes": [str(n) for n in r["notes"]]} for r in reports]
    setattr(model, REPORTS_ATTR, list(getattr(model, REPORTS_ATTR, [])) + kept)


def save(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any | None = None,
    source: str | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Write ``model`` to the directory ``path`` atomically; returns the path.

    ``source`` names the built-in model it came from (default: the model's own record), so
    ``slimline eval`` can find its data and baseline. ``source_dir`` is the local Hugging Face
    directory it was read from (default: the model's own record, set by the command line):
    its tokenizer, generation and sentence-transformers files and its card are carried over,
    never its weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save: expected an nn.Module, got {type(model).__name__}")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save: {str(target)!r} exists and is not a directory")
    origin = _source_dir(source_dir if source_dir is not None
                         else getattr(model, SOURCE_DIR_ATTR, None))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write(model, tmp, tokenizer, source or getattr(model, SOURCE_ATTR, None), origin)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _source_dir(value: str | Path | None) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        raise TypeError(f"save: source_dir must be a path, got {type(value).__name__}")
    if not Path(value).is_dir():
        raise ValueError(f"save: source_dir {str(value)!r} is not a directory")
    return Path(value)


def _write(
    model: nn.Module,
    directory: Path,
    tokenizer: Any | None,
    source: str | None,
    source_dir: Path | None,
) -> None:
    from safetensors.torch import save_file

    from slimline.export.companions import write_companions
    from slimline.export.hf_config import changes_weights

    tensors, aliases = _dedupe(model.state_dict())
    # A Hugging Face model the recipe left as it was stays readable by transformers: dense.
    if _architecture(model)["kind"] != "huggingface" or changes_weights(applied_recipe(model)):
        tensors, sparse = _encode_sparse(tensors)
    else:
        sparse = {}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    manifest = _manifest(model, aliases, sparse, source)
    (directory / RECIPE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    write_companions(model, directory, manifest, tokenizer, source_dir)


def _manifest(
    model: nn.Module, aliases: dict[str, str], sparse: dict[str, list[int]], source: str | None
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "recipe": applied_recipe(model),
        "architecture": _architecture(model),
        "modules": {
            name: {"type": type(m).__name__, "meta": m.slimline_meta()}  # type: ignore[operator]
            for name, m in _outermost_registered(model)
        },
        "aliases": aliases,
        "sparse": sparse,
        "source": source,
        "reports": list(getattr(model, REPORTS_ATTR, [])),
    }


def _outermost_registered(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Registered compressed modules not inside another one: an outer module's metadata
    describes and rebuilds the modules it holds (a LoRA layer around a packed base)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        inside = bool(found) and name.startswith(found[-1][0] + ".")  # depth-first order
        if name and not inside and is_registered_module(m):
            found.append((name, m))
    return found


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor; return tensors and ``{alias: kept_name}``."""
    kept: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype)
        if t.numel() > 0 and key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _encode_sparse(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Store tensors with many zeros as bitmask + values; returns ``{name: shape}`` too."""
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in tensors.items():
        if sparse_storage.worth_encoding(t):
            mask, values = sparse_storage.encode(t)
            out[name + sparse_storage.MASK_SUFFIX] = mask
            out[name + sparse_storage.VALUES_SUFFIX] = values
            shapes[name] = list(t.shape)
        else:
            out[name] = t
    return out, shapes


def _decode_sparse(state: dict[str, torch.Tensor], name: str, shape: list[int]) -> None:
    mask = state.pop(name + sparse_storage.MASK_SUFFIX)
    values = state.pop(name + sparse_storage.VALUES_SUFFIX)
    state[name] = sparse_storage.decode(mask, values, tuple(shape))


def _architecture(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        return {"kind": "huggingface", "class": type(model).__name__}
    qualified = f"{type(model).__module__}.{type(model).__qualname__}"
    if qualified in _ARCHITECTURES:
        kwargs = model.slimline_init_kwargs()  # type: ignore[operator]
        return {"kind": "registered", "class": qualified, "kwargs": kwargs}
    return {"kind": "user", "class": qualified}


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is swapped out, then removed."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The ``recipe.json`` of a checkpoint directory, checked (ValueError naming the file)."""
    directory = Path(path)
    manifest_path = directory / RECIPE_FILE
    if not directory.is_dir():
        raise ValueError(f"load: {str(directory)!r} does not exist or is not a directory")
    if not manifest_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ValueError(f"load: {str(directory)!r} has no {RECIPE_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"load: {manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load: {manifest_path} is not a slimline checkpoint")
    if data.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"load: {manifest_path}: checkpoint version {data.get('version')!r} "
                         "not supported")
    return checks.check_manifest(data, manifest_path)


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model; ``model`` is the skeleton to fill for user architectures.

    Every file is checked against the rebuilt architecture before any tensor is assigned
    (``core/checkpoint_checks.py``): a broken checkpoint raises a ValueError naming the file
    and the tensor, and ``model`` is left as it was.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_FILE
    header = checks.read_header(weights)
    skeleton = model if model is not None else _build_architecture(directory, manifest)
    recipe_file = directory / RECIPE_FILE
    replacements = rebuild_compressed_modules(skeleton, manifest["modules"], recipe_file)
    checks.check_tensors(
        weights, header, checks.expected_state(skeleton, replacements),
        aliases=manifest["aliases"], sparse=manifest["sparse"],
    )
    state = _read_state(weights, manifest["sparse"])
    for name, replacement in replacements.items():
        skeleton.set_submodule(name, replacement)
    skeleton.load_state_dict(state, strict=False, assign=True)  # checked: exactly its keys
    for alias, source in manifest["aliases"].items():
        _set_tensor(skeleton, alias, _get_tensor(skeleton, source))
    setattr(skeleton, RECIPE_ATTR, manifest["recipe"])
    if manifest.get("source"):
        setattr(skeleton, SOURCE_ATTR, manifest["source"])
    setattr(skeleton, REPORTS_ATTR, manifest["reports"])
    skeleton.eval()
    reapply_runtime_steps(skeleton, manifest["recipe"])
    bind_save_pretrained(skeleton)
    return skeleton


def bind_save_pretrained(model: nn.Module) -> None:
    """Route a compressed Hugging Face model's ``save_pretrained`` through :func:`save`."""
    from slimline.export import save_pretrained
    from slimline.export.hf_config import changes_weights

    if changes_weights(applied_recipe(model)):
        save_pretrained.bind(model)


def rebuild_compressed_modules(
    skeleton: nn.Module, modules: dict[str, Any], where: Path
) -> dict[str, nn.Module]:
    """The registered compressed modules the manifest records, built empty (not installed)."""
    built: dict[str, nn.Module] = {}
    for name, entry in modules.items():
        try:
            skeleton.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load: {where}: module {name!r} is not in the model") from None
        try:
            cls = module_type(entry["type"])  # the allow-list of compressed module classes
        except ValueError as exc:
            raise ValueError(f"load: {where}: module {name!r}: {exc}") from None
        try:
            built[name] = cls.from_slimline_meta(entry["meta"])  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"load: {where}: module {name!r} ({entry['type']}) has bad metadata: {exc}"
            ) from None
    return built


def _read_state(weights: Path, sparse: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise ValueError(f"load: {weights}: cannot be read: {exc}") from None
    for name, shape in sparse.items():
        try:
            _decode_sparse(state, name, shape)
        except ValueError as exc:
            raise ValueError(f"load: {weights}: tensor {name!r}: {exc}") from None
    return {name: _aligned(t) for name, t in state.items()}


# Bytes of alignment torch's CPU allocator gives every tensor it allocates.
_ALIGNMENT = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied if it does not start on a 64-byte boundary.

    safetensors hands out views of the file at its own offsets (8-byte aligned). CPU BLAS
    kernels take another path, with another rounding, on unaligned rows (e.g. a one-token
    float32 ``F.linear``), so without this a reloaded model can differ from the saved one in
    the last bit.
    """
    return tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()


def _build_architecture(directory: Path, manifest: dict[str, Any]) -> nn.Module:
    arch = manifest["architecture"]
    if arch["kind"] == "huggingface":
        return _build_huggingface(directory, arch["class"])
    if arch["kind"] == "registered":
        _import_defining_module(arch["class"])
        if arch["class"] not in _ARCHITECTURES:
            raise ValueError(f"load: architecture {arch['class']!r} is not registered")
        try:
            return _ARCHITECTURES[arch["class"]](**arch["kwargs"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"load: {directory / RECIPE_FILE}: architecture.kwargs do not "
                             f"build {arch['class']}: {exc}") from None
    raise ValueError(
        f"load: {arch['class']} is a user model class; pass an instance: sl.load(path, model=...)"
    )


def _build_huggingface(directory: Path, name: str) -> nn.Module:
    """An untrained ``transformers.<name>`` from ``config.json`` (only model classes)."""
    import transformers

    from slimline.export.hf_config import strip

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"load: transformers has no model class {name!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        strip(config)  # the marks that keep transformers alone away are not the model's
        built: nn.Module = cls(config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"load: {directory / 'config.json'} does not describe a {name}: "
                         f"{type(exc).__name__}: {exc}") from None
    return built


# Packages whose modules load may import to find a recorded class: importing the module that
# defines it runs its @register_architecture. Nothing outside runs at load; a user's own class
# is registered by importing its module before sl.load.
_IMPORTABLE_PACKAGES = ("slimline.",)


def _import_defining_module(qualified: str) -> None:
    """Import the slimline module named in ``qualified`` (``pkg.module.Class``), if not yet."""
    import importlib

    module = qualified.rpartition(".")[0]
    if qualified in _ARCHITECTURES or not module.startswith(_IMPORTABLE_PACKAGES):
        return
    try:
        importlib.import_module(module)
    except ImportError:
        return  # reported below as "not registered"


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    tensor: torch.Tensor = getattr(model.get_submodule(owner), attr)
    return tensor


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, tensor)


def reapply_runtime_steps(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Steps whose effect is not all in the tensors (``compile``) are applied again."""
    from slimline.core.recipe import Recipe
    from slimline.core.registry import StepContext, handler_for

    for step in Recipe.from_dict(recipe).steps:
        if step.reapply_on_load:
            handler_for(step)(model, step, StepContext())
