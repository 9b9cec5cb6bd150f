"""Read back the model a run folder trained: its spec, the recipe, the weights of the last
checkpoint (or of the best one, checkpoint-best.pt) and the masks of every phase, resolved by
the recipe's own modifiers (what export, report and inspect start from)."""

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
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]  # unstructured keep-masks by parameter name
    unit_masks: dict[str, torch.Tensor]  # head and neuron keep-masks by block
    placements: list[Placement]  # token selectors
    epoch: int


def open_run(run_dir: Path, best: bool = False) -> TrainedRun:
    """Load a run folder: its last checkpoint, or with `best` checkpoint-best.pt (the epoch of
    the best validation accuracy so far).

    Raises:
        SparsekitError: not a run folder, no checkpoint yet (or no best one), a damaged file, or
            a recipe.yaml edited after the checkpoint was written.
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
            weights=ckpt["model"],
            masks={k: v.cpu() for k, v in session.masks().items()},
            unit_masks={k: v.cpu() for k, v in session.unit_masks().items()},
            placements=session.token_placements(),
            epoch=int(ckpt["epoch"]),
        )
