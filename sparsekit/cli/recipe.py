"""`sparsekit recipe validate|show|schema`: check and explain recipes without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sparsekit.cli.apply import BatchOption, EpochsOption, LrOption, SetOption, overrides_from
from sparsekit.cli.errors import reports_errors
from sparsekit.recipe.load import load_recipe
from sparsekit.recipe.schema import Recipe
from sparsekit.timeline import Timeline

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
) -> None:
    """Print the phases with their windows resolved to epochs and steps."""
    recipe = load_recipe(file, overrides_from(set_, epochs, batch_size, lr))
    t = recipe.training
    timeline = Timeline.for_dataset(t.epochs, dataset_size, t.batch_size)
    console = Console()
    console.print(
        f"[bold]{recipe.name}[/]: {recipe.description.strip()}\n{t.epochs} epochs x "
        f"{timeline.steps_per_epoch:,} steps (batch {t.batch_size}, {dataset_size:,} images) = "
        f"{timeline.total_steps:,} steps; {t.optimizer.name} lr {t.optimizer.lr:g}"
    )
    console.print(phase_table(recipe, timeline))


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
            _settings(phase, timeline),
        )
    return table


def _settings(phase: Any, timeline: Timeline) -> str:
    if phase.kind == "unstructured_dst":
        every = max(1, timeline.steps(phase.update_every))
        return (
            f"sparsity {phase.sparsity:g} ({phase.distribution}), grow {phase.grow}, "
            f"every {every:,} steps, fraction {phase.update_fraction:g} {phase.fraction_decay}, "
            f"roles {','.join(phase.targets.roles)}"
        )
    if phase.kind == "magnitude_prune":
        return (
            f"sparsity {phase.sparsity:g} ({phase.distribution}), pruned once by magnitude, "
            f"roles {','.join(phase.targets.roles)}"
        )
    if phase.kind == "head_prune_grow":
        every = max(1, timeline.steps(phase.update_every))
        mlp = f", MLP {phase.mlp_density:g}" if phase.mlp_density is not None else ""
        return (
            f"heads {phase.head_density:g}{mlp} ({phase.budget}), every {every:,} steps, "
            f"fraction {phase.update_fraction:g} {phase.fraction_decay}"
        )
    if phase.kind == "token_select":
        where = ", ".join(
            f"keep {p.keep_ratio:g} before block {p.before_block}" for p in phase.resolved()
        )
        return f"{where}, temperature {phase.temperature_start:g} -> {phase.temperature_end:g}"
    if phase.kind == "dense_warmup":
        return "dense"
    fields = phase.model_dump(mode="json", exclude={"kind", "name", "start", "end"})
    return ", ".join(f"{key} {value}" for key, value in fields.items())


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (point your editor's YAML plugin at it)."""
    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))
