"""Recipes: the YAML format, its validation and overrides. Imports no torch."""

from sparsekit.recipe.load import dump_recipe, load_recipe
from sparsekit.recipe.schema import PHASE_KINDS, ROLES, Recipe
from sparsekit.recipe.span import Span

__all__ = ["PHASE_KINDS", "ROLES", "Recipe", "Span", "dump_recipe", "load_recipe"]
