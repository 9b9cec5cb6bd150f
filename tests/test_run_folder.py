"""Reading a run folder back: a recipe edited after training, checkpoints with a piece changed
or missing, and data that changed under a resumed run are refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import dst_recipe

from sparsekit import load_recipe
from sparsekit.errors import SparsekitError
from sparsekit.export import export_run
from sparsekit.run_folder.checkpoint import load_checkpoint, require_complete, save_checkpoint
from sparsekit.run_folder.records import read_metrics
from sparsekit.run_folder.trained_run import open_run
from sparsekit.train.trainer import RunConfig, train


def _config(out: Path, **kwargs) -> RunConfig:
    return RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=out,
        extra={"depth": 1, "embed_dim": 32, "num_heads": 2},
        **kwargs,
    )


def _recipe(sparsity: float = 0.5):
    return load_recipe(
        dst_recipe(sparsity=sparsity),
        ["training.epochs=2", "training.batch_size=32"],
    )


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped after its first of two epochs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(_recipe(), _config(out, stop_after_epoch=1))
    return out


def test_a_recipe_edited_after_training_is_refused_by_export_and_resume(
    stopped: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    text = (run / "recipe.yaml").read_text()
    assert "sparsity: 0.5" in text
    (run / "recipe.yaml").write_text(text.replace("sparsity: 0.5", "sparsity: 0.6"))
    with pytest.raises(SparsekitError, match=r"recipe.yaml \(sha256 [0-9a-f]{12}\) is not the "
                       r"recipe .*checkpoint.pt was trained under \(sha256 [0-9a-f]{12}\)"):  # fmt: skip
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # --resume with the edited recipe matches recipe.yaml's text, not the checkpoint.
    with pytest.raises(SparsekitError, match="edited after training"):
        train(_recipe(0.6), _config(run, resume=True))
    # The recipe it was trained under exports and resumes.
    (run / "recipe.yaml").write_text(text)
    export_run(run, tmp_path / "export")
    assert train(_recipe(), _config(run, resume=True))["epochs"] == 2


def test_a_checkpoint_is_hashed_whole(stopped: Path, tmp_path: Path) -> None:
    """Optimizer and phase state are under the hash too, not only the weights."""
    path = tmp_path / "checkpoint.pt"
    shutil.copy(stopped / "checkpoint.pt", path)
    raw = torch.load(path, weights_only=True)
    state = next(iter(raw["optimizer"]["state"].values()))
    state["exp_avg"].add_(1.0)  # edited after the fact, hash left as it was
    torch.save(raw, path)
    with pytest.raises(SparsekitError, match="modified or damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("piece", ["optimizer", "session", "rng", "steps_per_epoch"])
def test_an_incomplete_checkpoint_is_refused_by_name(
    stopped: Path, tmp_path: Path, piece: str
) -> None:
    payload = load_checkpoint(stopped / "checkpoint.pt")
    del payload[piece], payload["format"]
    save_checkpoint(tmp_path / "checkpoint.pt", payload)  # a correct hash of an incomplete one
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(SparsekitError, match=rf"incomplete or damaged checkpoint \({piece} "):
        require_complete(loaded, tmp_path / "checkpoint.pt")
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    shutil.copy(tmp_path / "checkpoint.pt", run / "checkpoint.pt")
    with pytest.raises(SparsekitError, match="incomplete or damaged checkpoint"):
        open_run(run)


def test_resume_refuses_data_that_changed(stopped: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    recipe = load_recipe(dst_recipe(sparsity=0.5), ["training.epochs=2", "training.batch_size=32"])
    from sparsekit.train import trainer

    original = trainer.build_data

    def fewer(*args, **kwargs):
        data = original(*args, **kwargs)
        data.train = torch.utils.data.Subset(data.train, range(100))
        return data

    monkeypatch.setattr(trainer, "build_data", fewer)
    with pytest.raises(SparsekitError, match="8 steps per epoch, but the data now gives 4"):
        train(recipe, _config(run, resume=True))


def test_a_torn_last_line_is_skipped_and_a_foreign_line_is_refused(
    stopped: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    count = len(read_metrics(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "epoch", "epo')  # a crash mid-append
    assert len(read_metrics(run)) == count
    (run / "metrics.jsonl").write_text('{"event": "epoch", "epoch": "two"}\n')
    with pytest.raises(SparsekitError, match=r"metrics.jsonl is damaged or was edited \(line 1"):
        read_metrics(run)
