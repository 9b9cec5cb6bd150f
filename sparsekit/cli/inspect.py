"""`sparsekit inspect PATH | --model NAME [--recipe FILE]`: what a run, an export or a recipe
keeps, block by block, against dense, priced by what really runs or by the paper's convention."""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from sparsekit.cli.apply import SetOption
from sparsekit.cli.errors import reports_errors
from sparsekit.errors import SparsekitError, UsageError
from sparsekit.run_folder.layout import CHECKPOINT_FILE

if TYPE_CHECKING:
    from torch import nn

    from sparsekit.analysis.cost import ModelCost
    from sparsekit.analysis.paper_flops import PaperCost
    from sparsekit.models import ModelSpec
    from sparsekit.recipe.schema import Recipe
    from sparsekit.timeline import Timeline

T = TypeVar("T")
IMAGENET_TRAIN_SIZE = 1_281_167  # as `sparsekit recipe show`: spans in steps need a dataset size
JSON_VERSION = 1


class Convention(StrEnum):
    runtime = "runtime"
    paper = "paper"


@reports_errors
def inspect(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A run folder (sparsekit apply) or an export (sparsekit export). Leave it out "
            "and give --model to price a model, or a recipe, before training."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Price this timm model instead of a PATH (deit_tiny/small/base work)."),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="With --model: price the model under this recipe's first masks."),
    ] = None,
    set_: SetOption = None,
    img_size: Annotated[
        int | None,
        typer.Option(min=1, help="With --model: image size (default: the model's own)."),
    ] = None,
    patch_size: Annotated[
        int | None,
        typer.Option(min=1, help="With --model: patch size (default: the model's own)."),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(min=1, help="With --model: classes (default: the model's own)."),
    ] = None,
    dataset_size: Annotated[
        int,
        typer.Option(help="With --recipe: training images per epoch, to resolve the windows."),
    ] = IMAGENET_TRAIN_SIZE,
    convention: Annotated[
        Convention,
        typer.Option(
            help="runtime: FLOPs the compacted model really runs (2 x multiply-adds, dense "
            "kernels). paper: the SViTE paper's multiply-accumulates (zeros, pruned units and "
            "dropped tokens saved)."
        ),
    ] = Convention.runtime,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object (both conventions) instead."),
    ] = False,
) -> None:
    """Per block: kept heads, MLP width, unstructured density, parameters and FLOPs; totals
    against the dense model."""
    from sparsekit.analysis.cost import model_cost
    from sparsekit.analysis.paper_flops import paper_model_cost
    from sparsekit.models import create_model

    model_only = [
        name
        for name, value in (
            ("--recipe", recipe),
            ("--set", set_),
            ("--img-size", img_size),
            ("--patch-size", patch_size),
            ("--num-classes", num_classes),
        )
        if value is not None and value != []
    ]
    if path is not None and model is not None:
        raise UsageError(
            f"give either PATH ({path}) or --model ({model}), not both: PATH inspects what a "
            "run or an export holds, --model prices a model (and --recipe) before training."
        )
    if path is None and model is None:
        raise UsageError(
            "nothing to inspect: give a run folder or an export as PATH, or --model NAME "
            "(with --recipe FILE to price a recipe before training it)."
        )
    if path is not None and model_only:
        raise UsageError(
            f"{', '.join(model_only)} only go with --model; a run folder or an export already "
            "records its model and masks."
        )
    if path is not None:
        spec, what, subject = _from_path(path)
        source = "run" if (path / CHECKPOINT_FILE).is_file() else "export"
        dense = _seeded(lambda: create_model(spec).eval())
    else:
        assert model is not None
        given = {"img_size": img_size, "patch_size": patch_size, "num_classes": num_classes}
        kwargs = {k: v for k, v in given.items() if v is not None}
        spec, what, subject, dense = _priced(model, kwargs, recipe, set_, dataset_size)
        source = "model"
    cost, dense_cost = model_cost(subject), model_cost(dense)
    paper, dense_paper = paper_model_cost(subject, dense), paper_model_cost(dense, dense)
    if as_json:
        record = _record(spec, source, path, recipe, cost, dense_cost, paper, dense_paper)
        typer.echo(json.dumps(record, indent=2))
        return
    console = Console()
    if convention is Convention.paper:
        console.print(_paper_table(spec, what, cost, dense_cost, paper, dense_paper))
        saving = _percent(1 - paper.macs / dense_paper.macs)
        fewer = _percent(1 - paper.params / dense_paper.params)
        console.print(
            f"paper convention: {paper.macs / 1e9:.1f} G ({paper.macs / 1e9:.2f} G) "
            f"multiply-accumulates against dense {dense_paper.macs / 1e9:.1f} G: {saving} "
            f"FLOPs saving; {paper.params / 1e6:.2f} M parameters ({fewer} fewer)."
        )
    else:
        console.print(_runtime_table(spec, what, cost, dense_cost))


def _percent(share: float) -> str:
    """A share as the paper prints it, 49.32%; never -0.00%."""
    return f"{round(100 * share, 2) + 0.0:.2f}%"


def _seeded(build: Callable[[], T]) -> T:
    """`build()` from a fixed random state, leaving the caller's untouched: random weights are
    the same on every call, so priced figures are reproducible to the last MAC (a weight that
    happens to be exactly 0 counts as saved in the paper's convention)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _from_path(path: Path) -> tuple[ModelSpec, str, nn.Module]:
    from sparsekit.export import load_compact, read_export
    from sparsekit.export.baked import baked_model
    from sparsekit.models import ModelSpec
    from sparsekit.run_folder.trained_run import open_run

    if not path.exists():
        raise SparsekitError(
            f"{path} does not exist; give the folder `sparsekit apply` or `sparsekit export` "
            "wrote, or --model NAME to price a model before training."
        )
    if (path / CHECKPOINT_FILE).is_file():
        run = open_run(path)
        what = f"run {path} (epoch {run.epoch}), compacted in memory"
        model = baked_model(run.spec, run.weights, run.masks, run.unit_masks, run.placements)
        return run.spec, what, model
    if (path / "model.safetensors").is_file() or path.suffix == ".safetensors":
        manifest, _ = read_export(path)
        spec = ModelSpec(manifest.model, manifest.model_kwargs)
        what = f"export {path} ({'compact' if manifest.compact else 'masked, full size'})"
        return spec, what, load_compact(path)
    raise SparsekitError(
        f"{path} is neither a run folder (with checkpoint.pt) nor an export (with "
        "model.safetensors); give the folder `sparsekit apply` or `sparsekit export` wrote."
    )


def _priced(
    name: str,
    kwargs: dict[str, Any],
    recipe_file: Path | None,
    overrides: list[str] | None,
    dataset_size: int,
) -> tuple[ModelSpec, str, nn.Module, nn.Module]:
    """The model `name` at its first masks under `recipe_file`, compacted, as an export of a
    run stopped at its first batch would hold it: the recipe is compiled by the real compiler
    and every prune/grow phase makes its first masks, so unit budgets and layer densities come
    from the modifiers' own rules."""
    from sparsekit.export.baked import baked_model
    from sparsekit.models import ModelSpec, create_model, resolve_model_name
    from sparsekit.recipe.load import load_recipe
    from sparsekit.timeline import Timeline

    spec = ModelSpec(resolve_model_name(name), kwargs)
    dense = _seeded(lambda: create_model(spec).eval())
    if recipe_file is None:
        if overrides:
            raise UsageError("--set overrides a recipe field; give --recipe FILE too.")
        return spec, f"model {spec.name}, dense", dense, dense
    if dataset_size < 1:
        raise UsageError(f"--dataset-size {dataset_size}: give at least 1 image.")
    loaded = load_recipe(recipe_file, overrides)
    timeline = Timeline.for_dataset(
        loaded.training.epochs, dataset_size, loaded.training.batch_size
    )
    # The same random weights as `dense`, token scorers drawn after them.
    probe, modifiers = _seeded(lambda: _compiled(spec, loaded, timeline))
    masks: dict[str, Any] = {}
    units: dict[str, Any] = {}
    placements: list[Any] = []
    for m in modifiers:
        m.first_masks()  # as the session does at the phase's first batch
        masks.update(m.masks())
        units.update(m.unit_masks())
        placements += m.token_placements()
    state = {k: v.detach() for k, v in probe.state_dict().items()}
    what = f"model {spec.name} under {recipe_file} (its first masks), compacted in memory"
    return spec, what, baked_model(spec, state, masks, units, placements), dense


def _compiled(spec: ModelSpec, recipe: Recipe, timeline: Timeline) -> tuple[nn.Module, list]:
    from sparsekit.compiler import compile_recipe
    from sparsekit.models import create_model

    probe = create_model(spec)
    return probe, compile_recipe(recipe, probe, timeline)


def _runtime_table(spec: ModelSpec, what: str, cost: ModelCost, dense: ModelCost) -> Table:
    table = Table(title=f"{spec.name}: {what}, {cost.tokens} tokens in")
    for column in ("block", "tokens", "heads", "MLP width", "weight density", "params", "MFLOPs"):
        table.add_column(column, justify="right")
    for i, (b, d) in enumerate(zip(cost.blocks, dense.blocks, strict=True)):
        table.add_row(
            str(i),
            f"{b.tokens}/{d.tokens}",
            f"{b.heads}/{d.heads}",
            f"{b.mlp_hidden}/{d.mlp_hidden}",
            f"{b.density:.3f}",
            f"{b.params:,}",
            f"{b.flops / 1e6:,.1f}",
        )
    table.add_section()
    table.add_row(
        "model",
        "",
        f"{sum(b.heads for b in cost.blocks)}/{sum(d.heads for d in dense.blocks)}",
        f"{sum(b.mlp_hidden for b in cost.blocks)}/{sum(d.mlp_hidden for d in dense.blocks)}",
        f"{cost.nonzero_params / cost.params:.3f}",
        f"{cost.params:,} ({cost.params / dense.params:.3f}x)",
        f"{cost.flops / 1e6:,.1f} ({cost.flops / dense.flops:.3f}x)",
    )
    return table


def _paper_table(
    spec: ModelSpec,
    what: str,
    cost: ModelCost,
    dense: ModelCost,
    paper: PaperCost,
    dense_paper: PaperCost,
) -> Table:
    table = Table(title=f"{spec.name}: {what}, {cost.tokens} tokens in (paper convention)")
    for column in ("block", "tokens", "heads", "MLP width", "weight density", "MMACs"):
        table.add_column(column, justify="right")
    rows = zip(cost.blocks, dense.blocks, paper.blocks, dense_paper.blocks, strict=True)
    for i, (b, d, p, dp) in enumerate(rows):
        table.add_row(
            str(i),
            f"{p.tokens}/{dp.tokens}",
            f"{p.heads}/{dp.heads}",
            f"{b.mlp_hidden}/{d.mlp_hidden}",
            f"{b.density:.3f}",
            f"{p.macs / 1e6:,.1f}",
        )
    table.add_section()
    table.add_row(
        "model",
        "",
        f"{sum(p.heads for p in paper.blocks)}/{sum(p.heads for p in dense_paper.blocks)}",
        f"{sum(b.mlp_hidden for b in cost.blocks)}/{sum(d.mlp_hidden for d in dense.blocks)}",
        f"{cost.nonzero_params / cost.params:.3f}",
        f"{paper.macs / 1e6:,.1f} ({paper.macs / dense_paper.macs:.3f}x)",
    )
    return table


def _record(
    spec: ModelSpec,
    source: str,
    path: Path | None,
    recipe: Path | None,
    cost: ModelCost,
    dense: ModelCost,
    paper: PaperCost,
    dense_paper: PaperCost,
) -> dict[str, Any]:
    """The JSON of `inspect --json`; every field is described in docs/export.md."""
    blocks = []
    rows = zip(cost.blocks, dense.blocks, paper.blocks, dense_paper.blocks, strict=True)
    for i, (b, d, p, dp) in enumerate(rows):
        blocks.append(
            {
                "block": i,
                "tokens": b.tokens,
                "dense_tokens": d.tokens,
                "heads": b.heads,
                "dense_heads": d.heads,
                "head_dim": b.head_dim,
                "mlp_hidden": b.mlp_hidden,
                "dense_mlp_hidden": d.mlp_hidden,
                "weight_density": b.density,
                "params": b.params,
                "runtime": {"flops": b.flops, "dense_flops": d.flops},
                "paper": {
                    "macs": p.macs,
                    "dense_macs": dp.macs,
                    "linear_macs": p.linear_macs,
                    "attention_macs": p.attention_macs,
                },
            }
        )
    return {
        "version": JSON_VERSION,
        "model": spec.name,
        "model_kwargs": spec.kwargs,
        "source": source,
        "path": None if path is None else str(path),
        "recipe": None if recipe is None else str(recipe),
        "tokens": cost.tokens,
        "runtime": {
            "flops": cost.flops,
            "dense_flops": dense.flops,
            "ratio": cost.flops / dense.flops,
            "params": cost.params,
            "dense_params": dense.params,
            "nonzero_params": cost.nonzero_params,
        },
        "paper": {
            "macs": paper.macs,
            "dense_macs": dense_paper.macs,
            "gmacs": round(paper.macs / 1e9, 1),
            "dense_gmacs": round(dense_paper.macs / 1e9, 1),
            "saving": 1 - paper.macs / dense_paper.macs,
            "params": paper.params,
            "dense_params": dense_paper.params,
            "patch_embed_macs": paper.patch_embed_macs,
            "head_macs": paper.head_macs,
            "scorer_macs": paper.scorer_macs,
        },
        "blocks": blocks,
    }
