"""Watching a run: metrics.csv beside metrics.jsonl, the best checkpoint beside the last
(`sparsekit export --best`), and TensorBoard event files (`apply --tensorboard`)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.recipe import load_recipe
from sparsekit.run_folder.checkpoint import load_checkpoint
from sparsekit.run_folder.records import CSV_COLUMNS, best_epoch, read_metrics
from sparsekit.run_folder.trained_run import open_run
from sparsekit.train import trainer
from sparsekit.train.tensorboard_log import scalars
from sparsekit.train.trainer import RunConfig, train

runner = CliRunner()
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
NO_TENSORBOARD = "the tensorboard package is not installed (pip install 'sparsekit[tensorboard]')"
RECIPE = {
    "name": "watch",
    "training": {"epochs": 3, "batch_size": 64, "schedule": {"warmup": 0}},
    "phases": [
        {"kind": "dense_warmup", "end": 1},
        {
            "kind": "unstructured_dst",
            "start": 1,
            "sparsity": 0.5,
            "update_every": "2 steps",
            "min_update_interval": "1 steps",
        },
    ],
}
# The validation accuracy each epoch reports (the real one, replaced): the best epoch is the
# second, and the third only ties it, so the best is not the last.
VAL_ACC = [0.5, 0.8, 0.8]
TIMING = {"train_time_s", "time_s"}


def run(folder: Path, **options) -> dict:
    config = RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=folder,
        extra={"depth": 1},
        tensorboard=HAS_TENSORBOARD,
        **options,
    )
    return train(load_recipe(dict(RECIPE)), config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """`full`: 3 epochs at once. `split`: stopped after epoch 1, resumed and stopped after
    epoch 2, rolled back to epoch 1's checkpoint (as if epoch 2's had been lost: its lines and
    TensorBoard points are past the checkpoint), resumed to the end. `at2`: the export of
    split's epoch 2, taken when it stopped there."""
    root = tmp_path_factory.mktemp("watch")
    with fixed_val_acc():
        run(root / "full")
        split = root / "split"
        run(split, stop_after_epoch=1)
        epoch1 = root / "epoch1.pt"
        shutil.copy(split / "checkpoint.pt", epoch1)
        run(split, resume=True, stop_after_epoch=2)
        result = runner.invoke(app, ["export", str(split), "-o", str(root / "at2")])
        assert result.exit_code == 0, result.output
        shutil.copy(epoch1, split / "checkpoint.pt")
        run(split, resume=True)
    return {"full": root / "full", "split": split, "at2": root / "at2", "root": root}


@contextlib.contextmanager
def fixed_val_acc() -> Iterator[None]:
    """Epochs report the validation accuracies of VAL_ACC."""
    real = trainer.epoch_metrics

    def metrics(run_, epoch, *args):
        return {**real(run_, epoch, *args), "val_acc": VAL_ACC[epoch]}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "epoch_metrics", metrics)
        yield


def csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def epochs_of(folder: Path) -> list[dict]:
    return [r for r in read_metrics(folder) if r["event"] == "epoch"]


def same(cell: str, value) -> bool:
    number = float(cell)
    return (math.isnan(number) and math.isnan(value)) or number == value


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "split"])
def test_metrics_csv_holds_the_epoch_lines_of_metrics_jsonl(runs, name: str) -> None:
    epochs = epochs_of(runs[name])
    rows = csv_rows(runs[name])
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert len(rows) == len(epochs)
    for row, record in zip(rows, epochs, strict=True):
        for column in CSV_COLUMNS:
            assert same(row[column], record[column]), (column, row[column], record[column])
    assert "layer_sparsity" not in rows[0]


@pytest.mark.slow
def test_a_resumed_run_writes_the_metrics_csv_of_an_uninterrupted_one(runs) -> None:
    full, split = csv_rows(runs["full"]), csv_rows(runs["split"])
    untimed = [c for c in CSV_COLUMNS if c not in TIMING]
    assert [[r[c] for c in untimed] for r in full] == [[r[c] for c in untimed] for r in split]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "split"])
def test_the_best_checkpoint_holds_the_epoch_of_the_best_val_acc(runs, name: str) -> None:
    folder = runs[name]
    best = load_checkpoint(folder / "checkpoint-best.pt")
    assert best_epoch(read_metrics(folder)) == (2, 0.8)
    assert best["epoch"] == 2 and load_checkpoint(folder / "checkpoint.pt")["epoch"] == 3
    assert open_run(folder, best=True).epoch == 2 and open_run(folder).epoch == 3


@pytest.mark.slow
def test_export_best_writes_the_best_epochs_weights(runs) -> None:
    out = runs["root"] / "best-export"
    result = runner.invoke(app, ["export", str(runs["full"]), "--best", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "best checkpoint" in result.output
    best, at2 = load_file(out / "model.safetensors"), load_file(runs["at2"] / "model.safetensors")
    assert best.keys() == at2.keys()
    for key in best:
        assert torch.equal(best[key], at2[key]), key
    last = open_run(runs["full"]).weights  # epoch 3: trained on, so other weights
    assert any(
        not torch.equal(last[k], v) for k, v in open_run(runs["full"], best=True).weights.items()
    )


@pytest.mark.slow
def test_export_best_without_a_best_checkpoint_is_one_error(runs) -> None:
    folder = runs["root"] / "old-run"
    shutil.copytree(runs["full"], folder)
    (folder / "checkpoint-best.pt").unlink()
    result = runner.invoke(app, ["export", str(folder), "--best", "-o", str(folder / "x")])
    assert result.exit_code == 1, result.output
    message = result.output.split("error:", 1)[1]
    assert "has no checkpoint-best.pt: it is written after the first epoch" in " ".join(
        message.split()
    )
    assert "Traceback" not in result.output and "\n\n" not in message.strip()
    assert not (folder / "x").exists()
    assert runner.invoke(app, ["export", str(folder), "-o", str(folder / "x")]).exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "recipe-edit"])
def test_a_damaged_best_checkpoint_is_refused_and_the_last_still_exports(runs, how) -> None:
    folder = runs["root"] / f"damaged-{how}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(runs["full"], folder)
    if how == "flip":
        data = bytearray((folder / "checkpoint-best.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "checkpoint-best.pt").write_bytes(bytes(data))
        expected = "checkpoint-best.pt"
    else:
        recipe = folder / "recipe.yaml"
        recipe.write_text(recipe.read_text().replace("sparsity: 0.5", "sparsity: 0.6"))
        expected = "checkpoint-best.pt was trained under"
    result = runner.invoke(app, ["export", str(folder), "--best", "-o", str(folder / "x")])
    assert result.exit_code == 1 and expected in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    if how == "flip":
        assert runner.invoke(app, ["export", str(folder), "-o", str(folder / "x")]).exit_code == 0


@pytest.mark.slow
def test_a_resume_mends_what_a_crash_left_behind(runs) -> None:
    """A crash right after epoch 2's checkpoint.pt was written: its copy as checkpoint-best.pt
    (still epoch 1's) and metrics.csv (behind metrics.jsonl) were lost. --resume makes them
    agree again."""
    folder = runs["root"] / "crashed"
    shutil.copytree(runs["full"], folder)
    shutil.copy(runs["full"] / "checkpoint-best.pt", folder / "checkpoint.pt")  # epoch 2's
    shutil.copy(runs["root"] / "epoch1.pt", folder / "checkpoint-best.pt")
    lines = [r for r in read_metrics(folder) if r["epoch"] <= 2]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "metrics.csv").write_text(",".join(CSV_COLUMNS) + "\n")
    with fixed_val_acc():
        run(folder, resume=True, stop_after_epoch=2)  # nothing left to train: it only mends
    assert load_checkpoint(folder / "checkpoint-best.pt")["epoch"] == 2
    assert [int(r["epoch"]) for r in csv_rows(folder)] == [1, 2]


@pytest.mark.slow
def test_the_run_folder_holds_the_new_files_and_stays_a_run_folder(runs) -> None:
    from sparsekit.run_folder.claim import is_run_folder

    names = {p.name for p in runs["full"].iterdir()}
    assert {"metrics.csv", "checkpoint-best.pt"} <= names
    assert ("tensorboard" in names) == HAS_TENSORBOARD
    assert is_run_folder(runs["full"])
    result = runner.invoke(app, ["report", str(runs["full"]), "-o", str(runs["root"] / "report")])
    assert result.exit_code == 0, result.output


def test_tensorboard_without_the_package_is_an_error_before_training(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("tensorboard", "torch.utils.tensorboard")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    args = ["apply", str(recipe), "--model", "deit_tiny", "--output", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--tensorboard"])
    assert result.exit_code == 1, result.output
    assert "pip install 'sparsekit[tensorboard]'" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_log_lines_become_scalars_at_their_steps() -> None:
    epoch = {"event": "epoch", "epoch": 1, "step": 5, "train_loss": 2.0, "train_acc": 0.1,
             "val_loss": 1.5, "val_acc": 0.2, "lr": 1e-3, "sparsity": 0.5,
             "layer_sparsity": {"a": 0.5}, "time_s": 3.0}  # fmt: skip
    assert scalars(epoch) == {"train/loss": 2.0, "train/acc": 0.1, "val/loss": 1.5,
                              "val/acc": 0.2, "lr": 1e-3, "sparsity": 0.5}  # fmt: skip
    update = {"epoch": 2, "phase": "svite", "kind": "unstructured_dst", "event": "mask_update",
              "step": 8, "fraction": 0.25, "regrown": 30, "deferred_from": 7,
              "heads": {"blocks.0.attn": [1]}}  # fmt: skip
    assert scalars(update) == {"svite/mask_update/fraction": 0.25, "svite/mask_update/regrown": 30}
    assert scalars({"epoch": 1, "event": "skipped_step", "step": 3}) == {"skipped_step": 1.0}


def board(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORBOARD, reason=NO_TENSORBOARD)
def test_tensorboard_holds_the_scalars_of_metrics_jsonl(runs) -> None:
    full = board(runs["full"])
    records = read_metrics(runs["full"])
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    assert {
        "train/loss",
        "val/acc",
        "lr",
        "sparsity",
        "unstructured_dst/mask_update/regrown",
    } <= set(full)
    assert full.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in full[tag]] == [s for s, _ in points], tag
        assert [v for _, v in full[tag]] == pytest.approx([v for _, v in points]), tag
    assert [s for s, _ in full["val/acc"]] == [4, 8, 12]  # 4 steps an epoch


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORBOARD, reason=NO_TENSORBOARD)
def test_a_resumed_run_draws_each_point_once(runs) -> None:
    full, split = board(runs["full"]), board(runs["split"])
    assert full.keys() == split.keys()
    for tag in full:
        assert [s for s, _ in split[tag]] == [s for s, _ in full[tag]], tag
        assert [v for _, v in split[tag]] == pytest.approx([v for _, v in full[tag]]), tag


@pytest.mark.slow
@pytest.mark.parametrize("file", ["metrics.csv", "checkpoint-best.pt"])
@pytest.mark.parametrize("how", ["delete", "garbage", "folder"])
def test_damage_to_the_new_files_ends_in_a_message_or_does_not_matter(runs, file, how) -> None:
    folder = runs["root"] / f"hostile-{file}-{how}"
    shutil.copytree(runs["full"], folder)
    path = folder / file
    path.unlink()
    if how == "garbage":
        path.write_bytes(b"\x00garbage\xff" * 10)
    elif how == "folder":
        path.mkdir()
    model = ["--model", "vit_tiny_patch16_224", "--data", "synthetic", "--model-arg", "depth=1"]
    for args in (
        ["export", str(folder), "--best", "-o", str(folder / "x")],
        ["report", str(folder), "-o", str(folder / "report")],
        ["apply", str(folder / "recipe.yaml"), *model, "--output", str(folder), "--resume"],
    ):
        result = runner.invoke(app, args)
        assert "Traceback" not in result.output, (args, result.output)
        assert result.exit_code == 0 or (result.exit_code == 1 and "error:" in result.output), (
            args,
            result.output,
        )
        if result.exit_code == 1:
            assert file in " ".join(result.output.split()), (args, result.output)
