"""Changes made to a live model, each with its undo, so the model can be given back plain.

Modifiers change the model they act on: gates are forward hooks, the active sub-network
swaps a module's `forward`, token selection adds scorer modules and hooks. Every such change
goes through a `ModelEdits` as a handle; `undo()` removes what is left, last change first, and
leaves the timm model as it was built: no hooks, no added modules or attributes, the class's own
`forward`. `Session.close()` undoes every modifier's edits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class Edit:
    """One change to a model; `remove()` undoes it (once: later calls do nothing)."""

    def __init__(self, undo: Callable[[], None]):
        self._undo: Callable[[], None] | None = undo

    @property
    def removed(self) -> bool:
        return self._undo is None

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


class ModelEdits:
    """The changes one owner (a modifier, a token selection) made to a model."""

    def __init__(self) -> None:
        self._edits: list[Edit] = []

    def add_undo(self, undo: Callable[[], None]) -> Edit:
        """Any other change, given the function that undoes it."""
        self._edits = [e for e in self._edits if not e.removed]
        edit = Edit(undo)
        self._edits.append(edit)
        return edit

    def hook(self, handle: RemovableHandle) -> Edit:
        """A hook just registered on a module (its `register_*_hook` handle)."""
        return self.add_undo(handle.remove)

    def add_module(self, parent: nn.Module, name: str, module: nn.Module) -> Edit:
        """`parent.name = module`, a child the timm model does not have."""
        if name in parent._modules or hasattr(parent, name):
            raise ValueError(f"{type(parent).__name__} already has an attribute {name!r}")
        parent.add_module(name, module)
        return self.add_undo(lambda: delattr(parent, name))

    def override_forward(self, module: nn.Module, forward: Callable[..., Any]) -> Edit:
        """Run `forward` (a bound method of `module`) instead of its class's forward."""
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__}.forward is already overridden")
        module.forward = forward

        def undo() -> None:
            if module.__dict__.get("forward") is forward:
                del module.forward

        return self.add_undo(undo)

    def undo(self) -> None:
        """Undo every change not removed yet, the last one first."""
        edits, self._edits = self._edits, []
        for edit in reversed(edits):
            edit.remove()
