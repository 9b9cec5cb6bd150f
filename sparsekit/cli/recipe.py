"""`sparsekit recipe validate|show|schema`: check and explain recipes without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from sparsekit.cli.apply import BatchOption, EpochsOption, LrOption, SetOption, overrides_from
from sparsekit.cli.errors import reports_errors
from sparsekit.recipe.cadence import cadence_notes
from sparsekit.recipe.load import load_recipe
from sparsekit.recipe.schema import Recipe
from sparsekit.timeline import Timeline

if TYPE_CHECKING:
    from torch import nn

app = typer.Typer(help="Validate, explain and describe recipes.", no_args_is_help=True)
IMAGENET_TRAIN_SIZE = 1_281_167


@app.command()
@reports_errors
def validate(
    file: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
) -> None:
    """Check a recipe (and overrides); exit 0 when valid, 2 with every problem otherwise."""
    recipe = load_recipe(file, overrides_from(set_, epochs, batch_size, lr))
    Console().print(f"{file}: valid recipe {recipe.name!r} with {len(recipe.phases)} phase(s).")


@app.command()
@reports_errors
def show(
    file: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    dataset_size: Annotated[
        int, typer.Option(min=1, help="Training images per epoch (default: ImageNet-1k).")
    ] = IMAGENET_TRAIN_SIZE,
    set_: SetOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="timm model (deit_tiny/small/base work too): also print the heads and MLP "
            "neurons each block keeps, and the tokens each selector keeps. Built without "
            "weights."
        ),
    ] = None,
    img_size: Annotated[
        int | None, typer.Option(min=1, help="Image size of --model (default: the model's own).")
    ] = None,
    patch_size: Annotated[
        int | None, typer.Option(min=1, help="Patch size of --model (default: the model's own).")
    ] = None,
) -> None:
    """Print the phases with their windows resolved to epochs and steps (and, with --model, the
    units and tokens each block keeps)."""
    recipe = load_recipe(file, overrides_from(set_, epochs, batch_size, lr))
    t = recipe.training
    timeline = Timeline.for_dataset(t.epochs, dataset_size, t.batch_size)
    console = Console()
    console.print(
        f"[bold]{recipe.name}[/]: {recipe.description.strip()}\n{t.epochs} epochs x "
        f"{timeline.steps_per_epoch:,} steps (batch {t.batch_size}, {dataset_size:,} images) = "
        f"{timeline.total_steps:,} steps; {t.optimizer.name} {t.describe_lr()}"
    )
    if t.distillation is not None:
        console.print(t.distillation.describe(), markup=False, highlight=False)
    if t.ema is not None:
        console.print(t.ema.describe(), markup=False, highlight=False)
    console.print(recipe.data.describe(), markup=False, highlight=False)
    console.print(phase_table(recipe, timeline))
    for note in cadence_notes(recipe, timeline):
        console.print(f"note: {note}", highlight=False)
    counted = [(i, p) for i, p in enumerate(recipe.phases) if p.per_block]
    if not counted:
        return
    if model is None:
        console.print(
            "The heads, MLP neurons and tokens kept in each block depend on the model: add "
            "--model NAME (for example --model deit_small) to print them."
        )
        return
    from sparsekit.modifiers import modifier_for

    built, label = _build(model, img_size, patch_size)
    for i, phase in counted:
        console.print(modifier_for(type(phase)).describe_on(phase, i, built, label))


def _build(name: str, img_size: int | None, patch_size: int | None) -> tuple[nn.Module, str]:
    """The timm model, without weights, and how to name it in a title."""
    from sparsekit.models import ModelSpec, create_model, resolve_model_name

    kwargs = {
        **({"img_size": img_size} if img_size else {}),
        **({"patch_size": patch_size} if patch_size else {}),
    }
    spec = ModelSpec(resolve_model_name(name), kwargs)
    built = create_model(spec)
    size = built.patch_embed.img_size
    patch = built.patch_embed.patch_size
    return built, f"{spec.name} at {size[0]} px, {patch[0]} px patches"


def phase_table(recipe: Recipe, timeline: Timeline) -> Table:
    """One row per phase: its window as written, in epochs and in steps, and its settings."""
    table = Table(title="phases")
    for column in ("#", "kind", "window (recipe)", "epochs", "steps", "settings"):
        table.add_column(column)
    spe = timeline.steps_per_epoch
    for i, phase in enumerate(recipe.phases):
        start, end = timeline.steps(phase.start), timeline.steps(phase.end)
        table.add_row(
            str(i),
            phase.kind + (f" ({phase.name})" if phase.name else ""),
            f"{phase.start} -> {phase.end}",
            f"{start / spe:g} -> {end / spe:g}",
            f"{start:,} -> {end:,}",
            phase.describe(timeline),
        )
    return table


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (point your editor's YAML plugin at it)."""
    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))
