"""`sparsekit export RUN_DIR --compact`: write the trained model as safetensors."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sparsekit.cli.errors import reports_errors


class Storage(StrEnum):
    auto = "auto"
    dense = "dense"


class Format(StrEnum):
    safetensors = "safetensors"
    onnx = "onnx"


@reports_errors
def export(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="Run folder written by `sparsekit apply`; with --format onnx, also an export "
            "folder (or its model.safetensors) to convert."
        ),
    ],
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
    storage: Annotated[
        Storage,
        typer.Option(
            help="auto: each sparse tensor stored as its non-zero values plus a bitmask when "
            "that is smaller (sparsekit's loader expands it); dense: every tensor as it is, "
            "which plain timm can read (with --masked: timm.create_model('local-dir:OUT')).",
        ),
    ] = Storage.auto,
    fmt: Annotated[
        Format,
        typer.Option(
            "--format",
            help="safetensors: the sparsekit export; onnx: OUT/model.onnx, the compacted model "
            "with its token selectors, opset 18, dynamic batch size (needs sparsekit[onnx]).",
        ),
    ] = Format.safetensors,
) -> None:
    """Export a run's last (or --best) checkpoint: OUT/model.safetensors, config.json and
    recipe.yaml."""
    from sparsekit.analysis.cost import model_cost
    from sparsekit.export import export_run, load_compact
    from sparsekit.export.preprocessing import plain_timm_refusal

    if fmt is Format.onnx:
        _export_onnx(run_dir, output, compact, best, ema, storage)
        return
    out = output or run_dir / "export"
    manifest = export_run(run_dir, out, compact=compact, best=best, ema=ema, storage=storage.value)
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
    refusal = plain_timm_refusal(manifest)
    Console().print(
        f"plain timm: timm.create_model('local-dir:{out}', pretrained=True) loads it."
        if refusal is None
        else f"plain timm cannot load it ({refusal}); config.json still holds its "
        "preprocessing. Plain timm loading needs --masked --storage dense.",
        highlight=False,
    )


def _export_onnx(
    source: Path, output: Path | None, compact: bool, best: bool, ema: bool, storage: Storage
) -> None:
    """`--format onnx`: a run folder or an existing export written as OUT/model.onnx."""
    from sparsekit.errors import UsageError
    from sparsekit.export.onnx import (
        OPSET,
        convert_export,
        default_output,
        export_run_onnx,
        refuse_with_format,
        require_onnx,
    )
    from sparsekit.run_folder.layout import CHECKPOINT_FILE

    is_run = (source / CHECKPOINT_FILE).is_file()
    refuse_with_format(compact, best, ema, is_run)
    if storage is not Storage.auto:
        raise UsageError(
            "--storage sets how safetensors are stored; leave it out with --format onnx."
        )
    require_onnx()
    is_export = (source / "model.safetensors").is_file() or source.suffix == ".safetensors"
    out = output or default_output(source, is_run or not is_export)
    if is_run or not is_export:  # not a run either: open_run says what a run folder holds
        done = export_run_onnx(source, out, best=best, ema=ema)
    else:
        done = convert_export(source, out)
    tokens = (
        "token selection as TopK + GatherElements before block"
        f"{'s' if len(done.token_selection) > 1 else ''} "
        + ", ".join(f"{b} (keep {r:g})" for b, r in done.token_selection)
        if done.token_selection
        else "no token selection"
    )
    Console().print(
        f"wrote {done.path} (ONNX opset {OPSET}, compact{', best checkpoint' if best else ''}"
        f"{', EMA weights' if ema else ''}): input {done.input_shape[0]} x "
        f"{' x '.join(map(str, done.input_shape[1:]))} (dynamic batch), {sum(done.heads)} heads "
        f"in {len(done.heads)} blocks, {tokens}. Checked in ONNX Runtime against PyTorch: "
        f"relative difference {done.max_rel_diff:.1e}.",
        highlight=False,
    )
