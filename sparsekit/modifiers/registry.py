"""Phase kind -> modifier class, filled by `@register` as each modifier module is imported."""

from __future__ import annotations

from collections.abc import Callable

from sparsekit.modifiers.base import Modifier

MODIFIERS: dict[str, type[Modifier]] = {}


def register(kind: str) -> Callable[[type[Modifier]], type[Modifier]]:
    """Class decorator: make `kind` (a recipe phase kind) build this modifier."""

    def decorate(cls: type[Modifier]) -> type[Modifier]:
        if kind in MODIFIERS:
            raise ValueError(f"phase kind {kind!r} is registered twice")
        cls.kind = kind
        MODIFIERS[kind] = cls
        return cls

    return decorate
