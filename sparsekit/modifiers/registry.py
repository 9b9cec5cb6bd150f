"""Phase config class -> modifier class: each modifier registers for its config with
`@register(ConfigClass)`, and a config names the module that holds its modifier, so the
registry needs no list of kinds of its own."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from sparsekit.modifiers.base import Modifier
from sparsekit.recipe.phases import PHASES, PhaseConfig

MODIFIERS: dict[type[PhaseConfig], type[Modifier]] = {}


def register(config: type[PhaseConfig]) -> Callable[[type[Modifier]], type[Modifier]]:
    """Class decorator: make phases of `config` (a recipe phase class) build this modifier."""

    def decorate(cls: type[Modifier]) -> type[Modifier]:
        if config in MODIFIERS:
            raise ValueError(f"phase kind {config.kind_name()!r} is registered twice")
        cls.kind = config.kind_name()
        cls.config_type = config
        MODIFIERS[config] = cls
        return cls

    return decorate


def modifier_for(config: type[PhaseConfig]) -> type[Modifier]:
    """The modifier class of a phase config class, importing its module on first use.

    Raises:
        LookupError: the module the config names registers no modifier for it (a plug-in bug).
    """
    if config not in MODIFIERS:
        importlib.import_module(config.modifier)
    if config not in MODIFIERS:
        raise LookupError(
            f"{config.modifier} registers no modifier for phase kind {config.kind_name()!r}: "
            f"decorate its modifier class with @register({config.__name__})."
        )
    return MODIFIERS[config]


def load_all() -> dict[type[PhaseConfig], type[Modifier]]:
    """Import every kind's modifier (the registry complete, for listing and tests)."""
    for config in PHASES:
        modifier_for(config)
    return MODIFIERS
