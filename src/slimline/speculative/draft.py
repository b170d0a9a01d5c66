"""The draft model of ``mode: draft``: where it comes from, and whether it may draft.

A draft proposes token ids that the target scores, so both must mean the same thing by
every id: the same vocabulary size (rows of the output head) and, where both come with a
tokenizer, the same token → id mapping. Anything else is refused with the first difference
found, before the target is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimline.speculative import hf


def resolve_reference(reference: str) -> str:
    """The reference as it is recorded: a built-in name as given, a directory made absolute
    (so that ``sl.load`` finds it from any working directory); ValueError if neither."""
    from slimline.models import BUILTIN_MODELS, is_builtin

    if is_builtin(reference.partition("@")[0]):
        return reference
    path = Path(reference).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"speculative.draft: {reference!r} is neither a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) nor an existing directory (sl.save output or a "
            "local Hugging Face model)"
        )
    return str(path.resolve())


def load_draft(reference: str) -> tuple[nn.Module, Any | None]:
    """The draft model (eval mode) and its tokenizer (None when it has none)."""
    from slimline.sources import resolve_model

    try:
        loaded = resolve_model(resolve_reference(reference))
    except (OSError, ValueError) as exc:
        raise ValueError(f"speculative.draft: cannot load {reference!r}: {exc}") from None
    model = loaded.model.eval()
    reason = hf.why_not(model)
    if reason is not None:
        raise ValueError(f"speculative.draft: {reference!r}: {reason}")
    return model, loaded.tokenizer


def target_tokenizer(model: nn.Module) -> Any | None:
    """The tokenizer the target came with, where that can be found: the local directory it
    was read from, or the built-in model it came from; None otherwise."""
    from slimline.core.checkpoint import SOURCE_ATTR, SOURCE_DIR_ATTR

    directory = getattr(model, SOURCE_DIR_ATTR, None)
    if directory is not None:
        from slimline.sources import _tokenizer

        return _tokenizer(Path(directory))
    source = getattr(model, SOURCE_ATTR, None)
    if isinstance(source, str):
        from slimline.models import is_builtin, load_builtin

        name, _, size = source.partition("@")
        if is_builtin(name):
            return load_builtin(name, size="small" if size == "small" else "full").tokenizer
    return None


def mismatch(
    target: nn.Module, draft: nn.Module, target_tok: Any | None, draft_tok: Any | None
) -> str | None:
    """Why ``draft`` cannot draft for ``target`` (vocabulary size, then token mapping); None
    when it can."""
    v_target, v_draft = hf.vocab_size(target), hf.vocab_size(draft)
    if v_target != v_draft:
        return (f"its vocabulary has {v_draft} tokens and the target's {v_target}: draft "
                "token ids would mean other tokens to the target")
    if target_tok is None or draft_tok is None:
        return None
    a, b = target_tok.get_vocab(), draft_tok.get_vocab()
    if a == b:
        return None
    differ = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
    shown = ", ".join(f"{t!r}: {a.get(t)} vs {b.get(t)}" for t in differ[:3])
    return (f"its tokenizer maps {len(differ)} token(s) to other ids than the target's "
            f"(target vs draft: {shown}{', ...' if len(differ) > 3 else ''})")
