"""Read back what `sparsekit apply` left in a run folder: the model it trained, the recipe, the
last checkpoint's weights and the masks of every phase, its metrics and its summary.

Run folders are files a user can edit, copy half of, or damage; every reader here checks what
it reads and names the file and the field that is wrong, instead of failing deep inside a
command with a KeyError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsekit.compiler import compile_recipe
from sparsekit.errors import SparsekitError
from sparsekit.models import ModelSpec, create_model
from sparsekit.recipe import Recipe, load_recipe
from sparsekit.session import Session
from sparsekit.surgery.tokens import Placement
from sparsekit.timeline import Timeline
from sparsekit.train.checkpoint import load_checkpoint, require_complete

MAX_RECORD_FILE = 256 << 20  # metrics.jsonl of a 600-epoch run is a few MB
MAX_HEADS = 4096  # head indices in a log line; the report draws a row per head


class _ModelRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kwargs: dict[str, Any]


class RunJson(BaseModel):
    """`run.json`: the model and data a run was started with."""

    model_config = ConfigDict(extra="allow")
    model: _ModelRecord
    data: str
    device: str = "auto"


class EpochRecord(BaseModel):
    """One `{"event": "epoch"}` line of metrics.jsonl: what the report and resume read."""

    model_config = ConfigDict(extra="allow")
    event: Literal["epoch"]
    epoch: int
    step: int
    train_loss: float
    val_acc: float
    sparsity: float
    layer_sparsity: dict[str, float] = {}


class EventRecord(BaseModel):
    """Any other line (mask_init, mask_update, skipped_step, ...)."""

    model_config = ConfigDict(extra="allow")
    event: str
    epoch: int
    heads: dict[str, list[Annotated[int, Field(ge=0, le=MAX_HEADS)]]] | None = (
        None  # kept, per block
    )


class _Sparsity(BaseModel):
    model_config = ConfigDict(extra="allow")
    global_sparsity: float | None = None


class _Units(BaseModel):
    model_config = ConfigDict(extra="allow")
    kept: int
    total: int


class Summary(BaseModel):
    """`summary.json`, written when the last epoch is done."""

    model_config = ConfigDict(extra="allow")
    model: str
    val_acc: float
    sparsity: _Sparsity = _Sparsity()
    units: dict[str, _Units] = {}


def _damaged(path: Path, err: Exception | str) -> SparsekitError:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the top level"
        err = f"{first['msg']} at {where}"
    return SparsekitError(
        f"{path} is damaged or was edited ({err}); sparsekit wrote it and reads it back as it "
        "wrote it. Restore it from a copy, or train the run again in a new --output folder."
    )


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_RECORD_FILE:
            raise _damaged(path, f"{path.stat().st_size:,} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from None


def read_run_json(folder: Path) -> RunJson:
    """The run's `run.json`, checked. Raises SparsekitError naming the file and field."""
    path = folder / "run.json"
    try:
        return RunJson.model_validate(_read_json(path))
    except ValidationError as err:
        raise _damaged(path, err) from None


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The run's `summary.json` (None while the run has not finished), checked."""
    path = folder / "summary.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    try:
        Summary.model_validate(data)
    except ValidationError as err:
        raise _damaged(path, err) from None
    return data


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, checked. A line that is not JSON is the last line
    torn by a crash mid-append (or one a resume cut off) and is skipped; a line that is JSON
    but not a record sparsekit writes is damage, and is refused with its line number."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    if path.stat().st_size > MAX_RECORD_FILE:
        raise _damaged(path, f"{path.stat().st_size:,} bytes")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        try:
            if not isinstance(record, dict):
                raise ValueError(f"line {number} holds a {type(record).__name__}, not a record")
            (EpochRecord if record.get("event") == "epoch" else EventRecord).model_validate(record)
        except ValidationError as err:
            first = err.errors()[0]
            raise _damaged(
                path, f"line {number}: {first['msg']} at {'.'.join(map(str, first['loc']))}"
            ) from None
        except ValueError as err:
            raise _damaged(path, err) from None
        records.append(record)
    return records


def recipe_sha256(recipe_yaml: str) -> str:
    """The hash a checkpoint records of the recipe it was trained under (recipe.yaml's text)."""
    return hashlib.sha256(recipe_yaml.encode()).hexdigest()


def check_recipe_hash(folder: Path, recipe_yaml: str, ckpt: dict[str, Any]) -> None:
    """Refuse a recipe.yaml that is not the one the checkpoint was trained under.

    Checkpoints written before the hash was recorded carry none and are not checked."""
    recorded = ckpt.get("recipe_sha256")
    if recorded is None:
        return
    now = recipe_sha256(recipe_yaml)
    if now != recorded:
        raise SparsekitError(
            f"{folder}/recipe.yaml (sha256 {now[:12]}) is not the recipe {folder}/checkpoint.pt "
            f"was trained under (sha256 {str(recorded)[:12]}): it was edited after training. "
            "Restore the recipe the run was trained under, or train the edited recipe in a new "
            "--output folder."
        )


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
        SparsekitError: not a run folder, no checkpoint yet, a damaged file, or a recipe.yaml
            edited after the checkpoint was written.
    """
    files = {name: run_dir / name for name in ("run.json", "recipe.yaml", "checkpoint.pt")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise SparsekitError(
            f"{run_dir} is not a finished sparsekit run folder: it lacks {', '.join(missing)}. "
            "Give the --output folder of `sparsekit apply` (default runs/<recipe>-<model>) after "
            "its first epoch has ended."
        )
    record = read_run_json(run_dir)
    spec = ModelSpec(record.model.name, record.model.kwargs)
    recipe = load_recipe(files["recipe.yaml"])
    recipe_yaml = files["recipe.yaml"].read_text(encoding="utf-8")
    ckpt = require_complete(load_checkpoint(files["checkpoint.pt"]), files["checkpoint.pt"])
    check_recipe_hash(run_dir, recipe_yaml, ckpt)
    # The recipe's modifiers read their own state: masks come out as the run saw them.
    probe = create_model(spec)
    timeline = Timeline(recipe.training.epochs, int(ckpt["steps_per_epoch"]))
    session = Session(probe, None, compile_recipe(recipe, probe, timeline), timeline)
    try:
        session.load_state_dict(ckpt["session"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
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
