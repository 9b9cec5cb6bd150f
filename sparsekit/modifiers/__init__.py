"""Modifiers: recipe phases at run time. Importing this package registers every kind."""

from sparsekit.modifiers import (  # noqa: F401  (registration)
    dense_warmup,
    head_prune_grow,
    magnitude_prune,
    token_select,
    unstructured_dst,
)
from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import MODIFIERS

__all__ = ["MODIFIERS", "Modifier"]
