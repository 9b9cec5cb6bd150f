"""Modifiers: recipe phases at run time. Importing this package registers every kind."""

from sparsekit.modifiers import dense_warmup, unstructured_dst  # noqa: F401  (registration)
from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import MODIFIERS

__all__ = ["MODIFIERS", "Modifier"]
