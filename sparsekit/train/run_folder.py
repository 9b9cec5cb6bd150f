"""Read back what `sparsekit apply` left in a run folder: the model it trained, the recipe, the
last checkpoint's weights and the masks of every phase."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekit.compiler import compile_recipe
from sparsekit.errors import SparsekitError
from sparsekit.models import ModelSpec, create_model
from sparsekit.recipe import Recipe, load_recipe
from sparsekit.session import Session
from sparsekit.surgery.tokens import Placement
from sparsekit.timeline import Timeline
from sparsekit.train.checkpoint import load_checkpoint


@dataclass
class TrainedRun:
    """The last checkpoint of a run, with its masks resolved by the recipe's own modifiers."""

    spec: ModelSpec
    recipe: Recipe
    recipe_yaml: str
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]  # unstructured keep-masks by parameter name
    unit_masks: dict[str, torch.Tensor]  # head and neuron keep-masks by block
    placements: list[Placement]  # token selectors
    epoch: int


def open_run(run_dir: Path) -> TrainedRun:
    """Load a run folder.

    Raises:
        SparsekitError: not a run folder, or no checkpoint yet.
    """
    files = {name: run_dir / name for name in ("run.json", "recipe.yaml", "checkpoint.pt")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise SparsekitError(
            f"{run_dir} is not a finished sparsekit run folder: it lacks {', '.join(missing)}. "
            "Give the --output folder of `sparsekit apply` (default runs/<recipe>-<model>) after "
            "its first epoch has ended."
        )
    record = json.loads(files["run.json"].read_text(encoding="utf-8"))
    spec = ModelSpec(record["model"]["name"], record["model"]["kwargs"])
    recipe_yaml = files["recipe.yaml"].read_text(encoding="utf-8")
    recipe = load_recipe(files["recipe.yaml"])
    ckpt = load_checkpoint(files["checkpoint.pt"])
    # The recipe's modifiers read their own state: masks come out as the run saw them.
    probe = create_model(spec)
    timeline = Timeline(recipe.training.epochs, int(ckpt["steps_per_epoch"]))
    session = Session(probe, None, compile_recipe(recipe, probe, timeline), timeline)
    try:
        session.load_state_dict(ckpt["session"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise SparsekitError(
            f"{files['checkpoint.pt']}: its phase state does not fit the recipe's phases "
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
