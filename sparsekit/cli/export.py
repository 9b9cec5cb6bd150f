"""`sparsekit export RUN_DIR --compact`: write the trained model as safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sparsekit.cli.errors import reports_errors


@reports_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `sparsekit apply`.")],
    compact: Annotated[
        bool,
        typer.Option(
            "--compact/--masked",
            help="--compact removes pruned heads and neurons physically (smaller, faster); "
            "--masked keeps the full-size model with pruned weights set to zero.",
        ),
    ] = True,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Export folder [default: RUN_DIR/export]."),
    ] = None,
    best: Annotated[
        bool,
        typer.Option(
            "--best",
            help="Export checkpoint-best.pt (the epoch with the best validation accuracy) "
            "instead of the last checkpoint.",
        ),
    ] = False,
    ema: Annotated[
        bool,
        typer.Option(
            "--ema",
            help="Export the moving average of the weights (training.ema; as sparse as the "
            "model) instead of the model's own weights; with --best, the best checkpoint's.",
        ),
    ] = False,
) -> None:
    """Export a run's last (or --best) checkpoint: OUT/model.safetensors, config.json and
    recipe.yaml."""
    from sparsekit.analysis.cost import model_cost
    from sparsekit.export import export_run, load_compact

    out = output or run_dir / "export"
    manifest = export_run(run_dir, out, compact=compact, best=best, ema=ema)
    cost = model_cost(load_compact(out))
    heads = sum(b.heads for b in manifest.blocks)
    Console().print(
        f"wrote {out}/model.safetensors ({'compact' if compact else 'masked, full size'}"
        f"{', best checkpoint' if best else ''}{', EMA weights' if ema else ''}): "
        f"{heads} heads in {len(manifest.blocks)} blocks, {cost.params:,} parameters "
        f"({cost.nonzero_params:,} non-zero), {cost.flops / 1e9:.3f} GFLOPs per image. "
        f"Load it with sparsekit.load_compact({str(out)!r}); `sparsekit inspect {out}` shows "
        "each block."
    )
