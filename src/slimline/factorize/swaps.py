"""Layer replacements that are undone when a step fails: a factorization is all or nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


class Swaps:
    """The layers a step has replaced so far, to put back if the step fails.

    With ``compress(..., inplace=True)`` the user's own model is the one changed: a step that
    raises halfway (a layer's forward failing in a later block, an interrupt) must not leave
    it half factorized. Factorization never changes the layers it replaces, so putting the
    originals back restores the model exactly, without a copy of it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.originals: list[tuple[str, nn.Module]] = []

    def replace(self, name: str, module: nn.Module) -> None:
        self.originals.append((name, self.model.get_submodule(name)))
        self.model.set_submodule(name, module)

    def undo(self) -> None:
        for name, module in reversed(self.originals):
            self.model.set_submodule(name, module)
        self.originals.clear()


@contextmanager
def undone_on_failure(model: nn.Module) -> Iterator[Swaps]:
    """Replacements made through the yielded :class:`Swaps` are undone if the block raises."""
    swaps = Swaps(model)
    try:
        yield swaps
    except BaseException:
        swaps.undo()
        raise
