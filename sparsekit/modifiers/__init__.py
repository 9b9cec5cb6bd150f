"""Modifiers: recipe phases at run time. Importing this package registers every kind."""

from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import MODIFIERS, load_all, modifier_for, register

load_all()

__all__ = ["MODIFIERS", "Modifier", "modifier_for", "register"]
