"""`sparsekit recipe validate|show|schema`: check and explain recipes without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sparsekit.cli.apply import BatchOption, EpochsOption, LrOption, SetOption, overrides_from
from sparsekit.cli.errors import reports_errors
from sparsekit.errors import RecipeError
from sparsekit.recipe.cadence import cadence_notes, update_cadence
from sparsekit.recipe.load import load_recipe
from sparsekit.recipe.schema import HeadPruneGrowPhase, Recipe, TokenSelectPhase
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
        f"{timeline.total_steps:,} steps; {t.optimizer.name} lr {t.optimizer.lr:g}"
    )
    console.print(phase_table(recipe, timeline))
    for note in cadence_notes(recipe, timeline):
        console.print(f"note: {note}", highlight=False)
    counted = [
        (i, p)
        for i, p in enumerate(recipe.phases)
        if isinstance(p, (HeadPruneGrowPhase, TokenSelectPhase))
    ]
    if not counted:
        return
    if model is None:
        console.print(
            "The heads, MLP neurons and tokens kept in each block depend on the model: add "
            "--model NAME (for example --model deit_small) to print them."
        )
        return
    built, label = _build(model, img_size, patch_size)
    for i, phase in counted:
        if isinstance(phase, HeadPruneGrowPhase):
            console.print(unit_table(i, phase, built, label))
        else:
            console.print(token_lines(i, phase, built, label))


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


def unit_table(index: int, phase: HeadPruneGrowPhase, model: nn.Module, label: str) -> Table:
    """Heads and MLP neurons each block keeps under a head_prune_grow phase (`kept_units`).

    Raises:
        RecipeError: an exact count larger than the model's, or min_heads above its heads.
    """
    from sparsekit.surgery.units import head_groups, neuron_groups

    heads = head_groups(model)
    neurons = neuron_groups(model) if phase.prunes_neurons else []
    fewest = min(g.units for g in heads)
    if phase.min_heads > fewest:
        raise RecipeError(
            f"min_heads is {phase.min_heads}, but this model's blocks have {fewest} heads; "
            f"set min_heads to {fewest} or fewer."
        )
    budget = (
        "per block, all run"
        if phase.budget == "per_block"
        else "at the first mask; budget: global keeps the total, blocks may trade units"
    )
    table = Table(title=f"phases[{index}] head_prune_grow on {label}: units kept ({budget})")
    for column in ("block", "heads kept", "MLP neurons kept"):
        table.add_column(column)
    totals = [0, 0, 0, 0]
    for b, group in enumerate(heads):
        kept = phase.kept_units("heads", group.units)
        totals[0] += kept
        totals[1] += group.units
        cell = "all (MLP whole)"
        if neurons:
            mlp = neurons[b]
            n_kept = phase.kept_units("neurons", mlp.units)
            totals[2] += n_kept
            totals[3] += mlp.units
            cell = f"{n_kept:,} of {mlp.units:,}"
        table.add_row(str(b), f"{kept} of {group.units}", cell)
    table.add_row(
        "total",
        f"{totals[0]:,} of {totals[1]:,}",
        f"{totals[2]:,} of {totals[3]:,}" if neurons else "",
    )
    return table


def token_lines(index: int, phase: TokenSelectPhase, model: nn.Module, label: str) -> str:
    """The patch tokens each selector of a token_select phase keeps in eval and export."""
    from sparsekit.surgery.tokens import kept_count

    patches = model.patch_embed.num_patches
    prefix = model.num_prefix_tokens
    parts = []
    for placement in phase.resolved():
        kept = kept_count(patches, placement.keep_ratio)
        others = "the class token" if prefix == 1 else f"its {prefix} prefix tokens"
        parts.append(
            f"before block {placement.before_block}: keeps {kept} of {patches} patch tokens "
            f"(ceil({placement.keep_ratio:g} x {patches})), {kept + prefix} tokens with {others}"
        )
        patches = kept
    return f"phases[{index}] token_select on {label}:\n  " + "\n  ".join(parts)


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
        cadence = update_cadence(phase, timeline)
        return (
            f"sparsity {phase.sparsity:g} ({phase.distribution}), grow {phase.grow}, "
            f"every {cadence.every:,} steps ({cadence.count()} updates), fraction {phase.update_fraction:g} "
            f"{_decay(phase.fraction_decay)}, "
            f"roles {','.join(phase.targets.roles)}"
        )
    if phase.kind == "magnitude_prune":
        return (
            f"sparsity {phase.sparsity:g} ({phase.distribution}), pruned once by magnitude, "
            f"roles {','.join(phase.targets.roles)}"
        )
    if phase.kind == "head_prune_grow":
        cadence = update_cadence(phase, timeline)
        heads = f"{phase.heads} per block" if phase.heads is not None else f"{phase.head_density:g}"
        mlp = ""
        if phase.mlp_neurons is not None:
            mlp = f", MLP {phase.mlp_neurons:,} per block"
        elif phase.mlp_density is not None:
            mlp = f", MLP {phase.mlp_density:g}"
        return (
            f"heads {heads}{mlp} ({phase.budget}), every {cadence.every:,} steps "
            f"({cadence.count()} updates), "
            f"fraction {phase.update_fraction:g} {_decay(phase.fraction_decay)}"
        )
    if phase.kind == "token_select":
        where = ", ".join(
            f"keep {p.keep_ratio:g} before block {p.before_block}" for p in phase.resolved()
        )
        return (
            f"{where}, temperature {phase.temperature_start:g} -> {phase.temperature_end:g} "
            f"{phase.temperature_decay}"
        )
    if phase.kind == "dense_warmup":
        return "dense"
    fields = phase.model_dump(mode="json", exclude={"kind", "name", "start", "end"})
    return ", ".join(f"{key} {value}" for key, value in fields.items())


def _decay(decay: str) -> str:
    return "reference (cosine over the run to 0.005)" if decay == "reference" else decay


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (point your editor's YAML plugin at it)."""
    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))
