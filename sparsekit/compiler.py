"""Recipe -> modifiers: the one place that joins the recipe format and the run-time objects.

Windows are resolved to exact step numbers for this run, and rules that need the model (which
weights each phase owns) or the dataset size (spans in steps) are checked here.
"""

from __future__ import annotations

import zlib

from torch import nn

from sparsekit.errors import RecipeError
from sparsekit.modifiers import Modifier, modifier_for
from sparsekit.recipe.schema import Recipe
from sparsekit.timeline import Timeline


def compile_recipe(recipe: Recipe, model: nn.Module, timeline: Timeline) -> list[Modifier]:
    """Build one modifier per phase, in recipe order.

    Raises:
        RecipeError: a window is empty in steps, or two phases own the same weights.
        SparsekitError: the model is not a supported architecture.
    """
    modifiers: list[Modifier] = []
    for index, phase in enumerate(recipe.phases):
        # Each phase draws from its own seed so adding a phase never changes another's masks.
        seed = zlib.crc32(f"{recipe.training.seed}:{index}".encode())
        try:
            modifier = modifier_for(type(phase)).build(phase, model, timeline, seed)
        except RecipeError as err:
            raise RecipeError(f"phases[{index}] ({phase.kind}): {err}") from None
        modifier.compute = recipe.training.compute
        modifier.check_compute()
        if modifier.end_step <= modifier.start_step:
            raise RecipeError(
                f"phases[{index}] ({phase.kind}): its window {phase.start} -> {phase.end} is "
                f"empty for this run (steps {modifier.start_step} -> {modifier.end_step} of "
                f"{timeline.total_steps}); widen it or give it as a share of the run ('80%')."
            )
        modifiers.append(modifier)
    _check_owned_weights(modifiers)
    _check_dense_windows(modifiers)
    return modifiers


def _check_dense_windows(modifiers: list[Modifier]) -> None:
    """No sparse phase may start inside a dense warm-up (checked again here in steps, since
    the recipe checks cannot compare spans written in steps with spans in epochs)."""
    for i, warm in enumerate(modifiers):
        if not warm.config.dense_window:
            continue
        for j, sparse in enumerate(modifiers):
            owns = sparse.masks_owned() or sparse.units_owned()
            if owns and sparse.start_step < warm.end_step:
                raise RecipeError(
                    f"phases[{j}] ({sparse.kind}) starts at step {sparse.start_step}, inside the "
                    f"dense warm-up phases[{i}] that ends at step {warm.end_step}; set its start "
                    f"to {warm.config.end.to_yaml()!r} or later."
                )


def _check_owned_weights(modifiers: list[Modifier]) -> None:
    owner: dict[str, int] = {}
    for index, modifier in enumerate(modifiers):
        for name in [*modifier.masks_owned(), *modifier.units_owned()]:
            if name in owner:
                raise RecipeError(
                    f"phases[{owner[name]}] and phases[{index}] both make {name} sparse; masks "
                    "last until the run ends, so they would act at once. Split the weights with "
                    "targets.include/exclude, or merge the phases."
                )
            owner[name] = index
