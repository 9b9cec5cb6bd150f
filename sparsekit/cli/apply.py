"""`sparsekit apply RECIPE --model NAME`: train a model under a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sparsekit.cli.errors import reports_errors
from sparsekit.errors import SparsekitError, UsageError
from sparsekit.recipe.load import clip, load_recipe, parse_value


def overrides_from(
    set_: list[str] | None, epochs: int | None, batch_size: int | None, lr: float | None
) -> list[str]:
    """The shortcut flags as `--set` overrides, so both are validated the same way."""
    out = list(set_ or [])
    if epochs is not None:
        out.append(f"training.epochs={epochs}")
    if batch_size is not None:
        out.append(f"training.batch_size={batch_size}")
    if lr is not None:
        out.append(f"training.optimizer.lr={lr}")
    return out


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings as timm keyword arguments, values read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SparsekitError(
                f"--model-arg {clip(item)!r}: expected KEY=VALUE with a timm argument name, "
                "for example --model-arg depth=6 or --model-arg qk_norm=true."
            )
        out[key.strip()] = parse_value(raw, f"--model-arg {clip(item)}")
    return out


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe field: training.epochs=3, phases[1].sparsity=0.6."
    ),
]
EpochsOption = Annotated[int | None, typer.Option(help="Shortcut for --set training.epochs=N.")]
BatchOption = Annotated[int | None, typer.Option(help="Shortcut for --set training.batch_size=N.")]
LrOption = Annotated[float | None, typer.Option(help="Shortcut for --set training.optimizer.lr=X.")]


@reports_errors
def apply(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="timm model name; deit_tiny/small/base work too. Optional with --init-from "
            "(the export's model)."
        ),
    ] = None,
    data: Annotated[
        str, typer.Option(help="digits, synthetic, or an ImageFolder root with train/ and val/.")
    ] = "digits",
    output: Annotated[
        Path | None,
        typer.Option(
            help="Run folder (default runs/<recipe>-<model>; with --init-from "
            "runs/<recipe>-<export folder>)."
        ),
    ] = None,
    set_: SetOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    img_size: Annotated[
        int | None,
        typer.Option(min=1, help="Image size (default: the data's, 8 for digits)."),
    ] = None,
    patch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Patch size (default: the data's, 4 for digits)."),
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        typer.Option("--model-arg", help="Extra timm model argument KEY=VALUE, e.g. depth=6."),
    ] = None,
    pretrained: Annotated[bool, typer.Option(help="Start from timm's pretrained weights.")] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Start from local weights (.safetensors, or a .pth/.pt/.bin state dict)."
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from a sparsekit export (compacted or masked): its architecture, "
            "weights, masks, kept heads and neurons and token selectors are the recipe's "
            "starting state (recipes/finetune_export.yaml holds them fixed).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Data loader worker processes (default: none for digits and synthetic; for "
            "image folders one per core of this process but one, at most 8).",
        ),
    ] = None,
    bad_images: Annotated[
        str,
        typer.Option(
            help="Image folders: 'refuse' stops at an unreadable image (named); 'skip' checks "
            "every image up front and leaves the unreadable ones out (counted)."
        ),
    ] = "refuse",
    resume: Annotated[bool, typer.Option(help="Continue the run in --output.")] = False,
    stop_after_epoch: Annotated[
        int | None,
        typer.Option(min=1, help="Stop (checkpointed) after this epoch; continue with --resume."),
    ] = None,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="Also write TensorBoard event files to OUTPUT/tensorboard/ (needs the "
            "tensorboard package: pip install 'sparsekit[tensorboard]').",
        ),
    ] = False,
) -> None:
    """Train MODEL under RECIPE: dense warm-up and sparse phases as the recipe declares."""
    from sparsekit.train.trainer import RunConfig, train

    if bad_images not in ("refuse", "skip"):
        raise UsageError(f"--bad-images {bad_images!r}: use 'refuse' or 'skip'.")
    loaded = load_recipe(recipe, overrides_from(set_, epochs, batch_size, lr))
    run = RunConfig(
        model=model,
        data=data,
        output=output,
        img_size=img_size,
        patch_size=patch_size,
        pretrained=pretrained,
        checkpoint=checkpoint,
        init_from=init_from,
        device=device,
        workers=workers,
        bad_images=bad_images,
        resume=resume,
        stop_after_epoch=stop_after_epoch,
        tensorboard=tensorboard,
        extra=parse_model_args(model_arg),
    )
    train(loaded, run, Console())
