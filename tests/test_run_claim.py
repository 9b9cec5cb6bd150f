"""Run folders: only sparsekit's own (or new, or empty) folders are written, by one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import dst_recipe

from sparsekit import load_recipe
from sparsekit.errors import SparsekitError
from sparsekit.run_folder.claim import claim_run_folder
from sparsekit.run_folder.layout import MARKER_FILE as MARKER
from sparsekit.train.trainer import RunConfig, train


def _train(out: Path, **kwargs) -> dict:
    recipe = load_recipe(dst_recipe())
    recipe = recipe.model_copy(
        update={"training": recipe.training.model_copy(update={"epochs": 1, "batch_size": 16})}
    )
    config = RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=out,
        img_size=32,
        patch_size=8,
        extra={"depth": 1, "embed_dim": 32, "num_heads": 2},
        **kwargs,
    )
    return train(recipe, config)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_folder_of_the_users_files_is_refused_untouched(tmp_path: Path) -> None:
    # The user's own recipe and log, in the folder they gave as --output.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("my own recipe\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = _snapshot(folder)
    with pytest.raises(SparsekitError, match="did not write"):
        _train(folder)
    assert _snapshot(folder) == before


def test_an_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SparsekitError, match="is a file"):
        _train(target)
    assert target.read_text() == "x"


def test_a_non_empty_system_folder_is_refused() -> None:
    with pytest.raises(SparsekitError, match="did not write"), claim_run_folder(Path("/")):
        pass
    assert not Path("/", MARKER).exists()


def test_new_and_empty_folders_become_run_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _train(empty)
    _train(tmp_path / "new" / "nested")
    for folder in (empty, tmp_path / "new" / "nested"):
        assert (folder / MARKER).is_file() and (folder / "summary.json").is_file()


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with claim_run_folder(folder):  # the first writer, still training
        with pytest.raises(SparsekitError, match="in use"):
            _train(folder)
        assert sorted(p.name for p in folder.iterdir()) == [MARKER]
    _train(folder)  # once it has finished, the folder is free


HOLDER = """
import sys, time
from pathlib import Path
from sparsekit.run_folder.claim import claim_run_folder
with claim_run_folder(Path(sys.argv[1])):
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_no_lock_behind(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(SparsekitError, match="in use"), claim_run_folder(folder):
            pass  # another process holds it
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    started = time.monotonic()
    with claim_run_folder(folder):  # the kernel dropped the dead process's lock
        assert time.monotonic() - started < 5


def test_two_apply_processes_on_one_output(tmp_path: Path) -> None:
    """Two `sparsekit apply` started together on one --output: one trains, the other is
    refused with the message and exit code 1, and the run folder holds one run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: race\ntraining: {epochs: 2, batch_size: 16, schedule: {warmup: 0}}\nphases: []\n"
    )
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "sparsekit", "apply", str(recipe), "--model", "vit_tiny_patch16_224",
        "--data", "synthetic", "--img-size", "32", "--patch-size", "8", "--output", str(out),
    ]  # fmt: skip
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while not (out / MARKER).exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=300)
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert second.returncode == 1 and "in use" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    epochs = (out / "metrics.jsonl").read_text().count('"event": "epoch"')
    assert epochs == 2


# --- export folders -----------------------------------------------------------------------
def _export(out: Path) -> None:
    import torch

    from sparsekit.export import export_model
    from sparsekit.models import ModelSpec, create_model

    spec = ModelSpec(
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    torch.manual_seed(0)
    export_model(spec, create_model(spec).state_dict(), out)


def test_export_replaces_an_earlier_export(tmp_path: Path) -> None:
    out = tmp_path / "export"
    _export(out)
    first = (out / "model.safetensors").stat().st_mtime_ns
    _export(out)
    assert (out / "model.safetensors").stat().st_mtime_ns >= first
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "recipe.yaml",
    ]


def test_export_refuses_a_downloaded_model_folder(tmp_path: Path) -> None:
    # A Hugging Face folder: its own model.safetensors (no sparsekit manifest), config, README.
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text('{"architectures": ["ViTModel"]}')
    (folder / "README.md").write_text("# my model\n")
    before = _snapshot(folder)
    with pytest.raises(SparsekitError, match="not an earlier sparsekit export"):
        _export(folder)
    assert _snapshot(folder) == before
    (folder / "README.md").unlink()  # even with only the export's file names
    with pytest.raises(SparsekitError, match="not an earlier sparsekit export"):
        _export(folder)


def test_a_second_exporter_is_refused(tmp_path: Path) -> None:
    from sparsekit.exclusive import locked_folder

    out = tmp_path / "export"
    out.mkdir()
    with locked_folder(out, "held", str), pytest.raises(SparsekitError, match="in use"):
        _export(out)  # another process is exporting into it
    assert list(out.iterdir()) == []
    _export(out)  # once the other writer is done
    assert (out / "model.safetensors").is_file()


def test_a_failed_export_into_a_new_folder_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    import sparsekit.export.writer as writer

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_replace", fail)
    with pytest.raises(SparsekitError, match="No space left on device"):
        _export(tmp_path / "new")
    assert not (tmp_path / "new").exists()
