"""Read back the model a run folder trained: its spec, the recipe, the weights of the last
checkpoint (or of the best one, checkpoint-best.pt; the model's own, or its moving average under
training.ema) and the masks of every phase, resolved by the recipe's own modifiers (what
export, report and inspect start from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekit.compiler import compile_recipe
from sparsekit.errors import SparsekitError
from sparsekit.models import ModelSpec, create_model
from sparsekit.recipe import Recipe, load_recipe
from sparsekit.run_folder.checkpoint import STATE_MISMATCH, read_checkpoint
from sparsekit.run_folder.layout import BEST_CHECKPOINT_FILE, CHECKPOINT_FILE, RECIPE_FILE, RUN_FILE
from sparsekit.run_folder.records import read_recipe_yaml, read_run_json
from sparsekit.session import Session
from sparsekit.surgery.tokens import Placement
from sparsekit.timeline import Timeline


@dataclass
class TrainedRun:
    """A checkpoint of a run (the last, or the best), with its masks resolved by the recipe's
    own modifiers."""

    spec: ModelSpec
    recipe: Recipe
    recipe_yaml: str
    weights: dict[str, torch.Tensor]  # the model's state dict (or, with `ema`, its average's)
    masks: dict[str, torch.Tensor]  # unstructured keep-masks by parameter name
    unit_masks: dict[str, torch.Tensor]  # head and neuron keep-masks by block
    placements: list[Placement]  # token selectors
    epoch: int


def open_run(run_dir: Path, best: bool = False, ema: bool = False) -> TrainedRun:
    """Load a run folder: its last checkpoint, or with `best` checkpoint-best.pt (the epoch of
    the best validation accuracy so far); with `ema`, the checkpoint's moving average of the
    weights (training.ema, as sparse as the model) instead of the model's weights.

    Raises:
        SparsekitError: not a run folder, no checkpoint yet (or no best one), a damaged file, a
            recipe.yaml edited after the checkpoint was written, or `ema` for a run trained
            without one.
    """
    missing = [
        name for name in (RUN_FILE, RECIPE_FILE, CHECKPOINT_FILE) if not (run_dir / name).is_file()
    ]
    if missing:
        raise SparsekitError(
            f"{run_dir} is not a finished sparsekit run folder: it lacks {', '.join(missing)}. "
            "Give the --output folder of `sparsekit apply` (default runs/<recipe>-<model>) after "
            "its first epoch has ended."
        )
    name = BEST_CHECKPOINT_FILE if best else CHECKPOINT_FILE
    if best and not (run_dir / name).is_file():
        raise SparsekitError(
            f"{run_dir} has no {name}: it is written after the first epoch (and again whenever "
            "the validation accuracy improves), so this run has no best checkpoint yet, or it "
            "was trained by a sparsekit version that did not keep one. Use the last checkpoint "
            "(leave out --best)."
        )
    record = read_run_json(run_dir)
    spec = ModelSpec(record.model.name, record.model.kwargs)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    recipe_yaml = read_recipe_yaml(run_dir)
    ckpt = read_checkpoint(run_dir, recipe_yaml, name)
    weights = _ema_weights(run_dir / name, recipe, ckpt) if ema else ckpt["model"]
    # The recipe's modifiers read their own state: masks come out as the run saw them.
    probe = create_model(spec)
    timeline = Timeline(recipe.training.epochs, int(ckpt["steps_per_epoch"]))
    with Session(probe, None, compile_recipe(recipe, probe, timeline), timeline) as session:
        try:
            session.load_state_dict(ckpt["session"])
        except STATE_MISMATCH as err:
            raise SparsekitError(
                f"{run_dir / name}: its phase state does not fit the recipe's phases "
                f"({type(err).__name__}: {err}); it was written by another sparsekit version or "
                "recipe."
            ) from None
        return TrainedRun(
            spec=spec,
            recipe=recipe,
            recipe_yaml=recipe_yaml,
            weights=weights,
            masks={k: v.cpu() for k, v in session.masks().items()},
            unit_masks={k: v.cpu() for k, v in session.unit_masks().items()},
            placements=session.token_placements(),
            epoch=int(ckpt["epoch"]),
        )


def _ema_weights(path: Path, recipe: Recipe, ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's moving average of the weights, or why there is none."""
    if recipe.training.ema is None:
        raise SparsekitError(
            f"{path.parent} was trained without a moving average of the weights (training.ema "
            f"is null in its {RECIPE_FILE}), so there is no EMA to export. Leave out --ema to "
            "export the model's own weights, or train with training.ema set (e.g. --set "
            "training.ema.decay=0.99996)."
        )
    state = ckpt.get("ema")
    if not isinstance(state, dict) or state.keys() != ckpt["model"].keys():
        raise SparsekitError(
            f"{path}: its recipe sets training.ema, but the checkpoint holds no complete EMA of "
            "the model's weights; it was not written whole by sparsekit. Export the model's own "
            "weights (leave out --ema), or resume from a good copy."
        )
    return state
