"""`sparsekit inspect PATH`: what a run or an export kept, block by block, against dense."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sparsekit.cli.errors import reports_errors
from sparsekit.errors import SparsekitError


@reports_errors
def inspect(
    path: Annotated[
        Path, typer.Argument(help="A run folder (sparsekit apply) or an export (sparsekit export).")
    ],
) -> None:
    """Per block: kept heads, MLP width, unstructured density, parameters and FLOPs; totals
    against the dense model."""
    from sparsekit.analysis.cost import model_cost
    from sparsekit.export import load_compact, read_export
    from sparsekit.export.writer import baked_model
    from sparsekit.models import ModelSpec, create_model
    from sparsekit.train.run_folder import open_run

    if (path / "checkpoint.pt").is_file():
        run = open_run(path)
        spec, what = run.spec, f"run {path} (epoch {run.epoch}), compacted in memory"
        model = baked_model(spec, run.weights, run.masks, run.unit_masks, run.placements)
    elif (path / "model.safetensors").is_file() or path.suffix == ".safetensors":
        manifest, _ = read_export(path)
        spec = ModelSpec(manifest.model, manifest.model_kwargs)
        what = f"export {path} ({'compact' if manifest.compact else 'masked, full size'})"
        model = load_compact(path)
    else:
        raise SparsekitError(
            f"{path} is neither a run folder (with checkpoint.pt) nor an export (with "
            "model.safetensors); give the folder `sparsekit apply` or `sparsekit export` wrote."
        )
    cost, dense = model_cost(model), model_cost(create_model(spec))
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
    Console().print(table)
