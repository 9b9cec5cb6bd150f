"""`sparsekit eval EXPORT --data DIR`: an export's accuracy on an image folder, with the
export's own preprocessing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sparsekit.cli.errors import reports_errors
from sparsekit.errors import SparsekitError


@reports_errors
def evaluate(
    export: Annotated[Path, typer.Argument(help="A sparsekit export (its folder).")],
    data: Annotated[
        Path,
        typer.Option(
            help="An image folder: class folders (CLASS/IMAGE), or an ImageFolder root whose "
            "val/ is evaluated."
        ),
    ],
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Images per batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(min=0, max=256, help="Data loader worker processes.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
) -> None:
    """Top-1 and top-5 accuracy and loss of EXPORT on the images in --data, resized, cropped and
    normalised as the export's config.json says (its training's own evaluation transform)."""
    from sparsekit.device import pick_device
    from sparsekit.export.loader import built_export, read_export
    from sparsekit.export.preprocessing import eval_transform
    from sparsekit.train.accuracy import eval_split, evaluate_folder

    if not data.is_dir():
        raise SparsekitError(f"--data {data}: no such folder; give a folder of class folders.")
    manifest, tensors = read_export(export)
    model = built_export(export, manifest, tensors)
    channels = model.patch_embed.proj.in_channels
    if channels != 3:
        raise SparsekitError(
            f"{export} takes {channels}-channel images (it was trained on --data digits or "
            "another built-in set of tensors), so it cannot read an image folder's RGB files."
        )
    result = evaluate_folder(
        model, data, eval_transform(manifest), pick_device(device), batch_size, workers
    )
    record = {"export": str(export), "data": str(eval_split(data)), **result.to_dict()}
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    top5 = f", top-5 {result.top5:.4f}" if result.top5 is not None else ""
    Console().print(
        f"{export} on {eval_split(data)}: {result.images:,} images, top-1 {result.top1:.4f}"
        f"{top5}, loss {result.loss:.4f}",
        highlight=False,
    )
