"""Docstring sentences of the standard library: the text data of the ``minilm`` encoder.

Every module, class and function docstring of the kept stdlib files (see
:mod:`slimline.models.stdlib_files`) is cut into paragraphs and sentences; code, doctests,
field lists and odd fragments are dropped, and duplicates are removed (a sentence belongs to
the split of the first file, in path order, that contains it, so no sentence is in two splits).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence

from slimline.models.stdlib_files import SPLITS, Split, StdlibFile

MIN_WORDS = 5
MAX_WORDS = 60
_MIN_ALPHA_FRACTION = 0.75  # of non-space characters; lower means code or tables, not prose
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings(source: str) -> list[str]:
    """All docstrings of a module's source, in ``ast.walk`` order; [] if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def _prose_paragraphs(doc: str) -> Iterator[str]:
    """Paragraphs of plain prose, each joined onto one line."""
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        # indented lines are literal blocks, argument tables or continuation of code
        if any(line[:1].isspace() for line in lines):
            continue
        if any(line.lstrip().startswith((">>>", "...", ":", "@", "-", "*", "|")) for line in lines):
            continue
        yield " ".join(" ".join(lines).split())


def is_good_sentence(sentence: str) -> bool:
    """A complete prose sentence of 5–60 words: capitalised, ends in . ! or ?, mostly letters."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?" or sentence.endswith("..."):
        return False
    if sentence.count("(") != sentence.count(")"):
        return False  # cut inside a parenthesis, e.g. at "(E.g."
    chars = [c for c in sentence if not c.isspace()]
    alpha = sum(c.isalpha() for c in chars)
    return alpha >= _MIN_ALPHA_FRACTION * len(chars)


def sentences(doc: str) -> list[str]:
    """The good sentences of one docstring, in order."""
    out: list[str] = []
    for paragraph in _prose_paragraphs(doc):
        out.extend(s for s in _SENTENCE_END.split(paragraph) if is_good_sentence(s))
    return out


def docstring_sentences(files: Sequence[StdlibFile]) -> dict[Split, list[str]]:
    """Unique docstring sentences of ``files`` per split, in file path order."""
    seen: set[str] = set()
    out: dict[Split, list[str]] = {split: [] for split in SPLITS}
    for f in sorted(files, key=lambda f: f.relpath):
        for doc in docstrings(f.read_text()):
            for sentence in sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    out[f.split].append(sentence)
    return out
