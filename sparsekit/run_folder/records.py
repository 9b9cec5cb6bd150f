"""The run folder's text files: `recipe.yaml`, `run.json`, `metrics.jsonl`, `metrics.csv` and
`summary.json`.

Written atomically (metrics.jsonl is appended to, one epoch at a time, and cut back on
`--resume`; metrics.csv is rewritten whole from metrics.jsonl each time that changes, so the
two never disagree). Run folders are files a user can edit, copy half of, or damage; every
reader here checks what it reads and names the file and the field that is wrong, instead of
failing deep inside a command with a KeyError.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsekit.atomic import write_text_atomic
from sparsekit.errors import SparsekitError
from sparsekit.models import ModelSpec
from sparsekit.run_folder.layout import (
    METRICS_CSV_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    RUN_FILE,
    SUMMARY_FILE,
)

MAX_RECORD_FILE = 256 << 20  # metrics.jsonl of a 600-epoch run is a few MB
MAX_HEADS = 4096  # head indices in a log line; the report draws a row per head
# metrics.csv's columns: the scalars of an epoch line (per-layer sparsity stays in metrics.jsonl).
CSV_COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "sparsity",
    "train_time_s",
    "time_s",
)
# Columns of runs that log them only (training.ema), added after CSV_COLUMNS when a line has them.
OPTIONAL_CSV_COLUMNS = ("ema_val_loss", "ema_val_acc")


class _ModelRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kwargs: dict[str, Any]


class _InitFromRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RunJson(BaseModel):
    """`run.json`: the model and data a run was started with (and the export it started from,
    with --init-from)."""

    model_config = ConfigDict(extra="allow")
    model: _ModelRecord
    data: str
    device: str = "auto"
    init_from: _InitFromRecord | None = None


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


def start_records(
    folder: Path,
    recipe_yaml: str,
    spec: ModelSpec,
    data: str,
    device: str,
    init_from: dict[str, str] | None = None,
) -> None:
    """A new run's records: `recipe.yaml` (the resolved recipe, after --set and --epochs, as
    `dump_recipe` wrote it), `run.json` (the timm model and its arguments, the data, the device
    asked for, and with --init-from the export's path and hash) and an empty `metrics.jsonl`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / RECIPE_FILE, recipe_yaml)
    record: dict[str, Any] = {"model": asdict(spec), "data": data, "device": device}
    if init_from is not None:
        record["init_from"] = init_from
    write_text_atomic(folder / RUN_FILE, json.dumps(record, indent=2))
    write_metrics(folder, [])


def read_recipe_yaml(folder: Path) -> str:
    """The text of the run's `recipe.yaml` ("" when it has none)."""
    path = folder / RECIPE_FILE
    return path.read_text(encoding="utf-8") if path.exists() else ""


def read_run_json(folder: Path) -> RunJson:
    """The run's `run.json`, checked. Raises SparsekitError naming the file and field."""
    path = folder / RUN_FILE
    try:
        return RunJson.model_validate(_read_json(path))
    except ValidationError as err:
        raise _damaged(path, err) from None


def write_metrics(folder: Path, records: list[dict[str, Any]]) -> None:
    """Replace `metrics.jsonl` with `records` (none, when a run starts), and metrics.csv with
    their epoch lines."""
    write_text_atomic(folder / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    write_metrics_csv(folder, records)


def write_metrics_csv(folder: Path, records: list[dict[str, Any]]) -> None:
    """Replace `metrics.csv` with one row per epoch line of `records`: the `CSV_COLUMNS` (and
    the `OPTIONAL_CSV_COLUMNS` some line has), a field the line lacks left empty. Floats are
    written as Python prints them (`repr`), so each cell reads back as the very number
    metrics.jsonl holds (`nan` for a NaN)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    epochs = [record for record in records if record.get("event") == "epoch"]
    columns = CSV_COLUMNS + tuple(
        column for column in OPTIONAL_CSV_COLUMNS if any(column in r for r in epochs)
    )
    writer.writerow(columns)
    for record in epochs:
        writer.writerow([record.get(column) for column in columns])
    write_text_atomic(folder / METRICS_CSV_FILE, text.getvalue())


def append_metrics(folder: Path, records: list[dict[str, Any]]) -> None:
    """Add an epoch's lines to `metrics.jsonl` (a crash mid-append tears only the last line,
    which `read_metrics` skips).

    Raises:
        SparsekitError: the disk is full or the file cannot be written.
    """
    try:
        with open(folder / METRICS_FILE, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise SparsekitError(
            f"cannot append to {folder}/{METRICS_FILE} ({err.strerror or err}); the checkpoint "
            "of the previous epoch is intact. Free disk space (or fix the folder) and continue "
            "with --resume."
        ) from None
    write_metrics_csv(folder, read_metrics(folder))


def keep_metrics_through(folder: Path, epoch: int) -> None:
    """Drop the lines of epochs after `epoch` (the checkpoint's): a resumed run writes them
    again."""
    write_metrics(folder, [r for r in read_metrics(folder) if r.get("epoch", 0) <= epoch])


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, checked. A line that is not JSON is the last line
    torn by a crash mid-append (or one a resume cut off) and is skipped; a line that is JSON
    but not a record sparsekit writes is damage, and is refused with its line number."""
    path = folder / METRICS_FILE
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


def best_epoch(records: list[dict[str, Any]]) -> tuple[int, float] | None:
    """The epoch whose validation accuracy is higher than every earlier epoch's and not
    beaten later (the first of equals), and that accuracy; None before any epoch (or when
    every accuracy is NaN). The trainer keeps that epoch's checkpoint as checkpoint-best.pt."""
    best: tuple[int, float] | None = None
    for record in records:
        if record.get("event") == "epoch" and is_better(record["val_acc"], best):
            best = (record["epoch"], record["val_acc"])
    return best


def is_better(val_acc: float, best: tuple[int, float] | None) -> bool:
    """Whether an epoch's validation accuracy beats the best so far (strictly: a tie keeps the
    earlier epoch; a NaN never beats anything)."""
    return not math.isnan(val_acc) and (best is None or val_acc > best[1])


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """`summary.json`, once the last epoch is done."""
    write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2))


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The run's `summary.json` (None while the run has not finished), checked."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    try:
        Summary.model_validate(data)
    except ValidationError as err:
        raise _damaged(path, err) from None
    return data


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
