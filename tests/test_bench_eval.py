"""`sparsekit bench` and `sparsekit eval`: an export measured where it will run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import apply_on_folder, digits_folder
from typer.testing import CliRunner

from sparsekit.cli.main import app

runner = CliRunner()
RECIPE = {
    "name": "heads",
    "training": {"epochs": 2, "batch_size": 32, "schedule": {"warmup": 0}},
    "phases": [
        {
            "kind": "head_prune_grow",
            "head_density": 0.5,
            "mlp_density": 0.5,
            "update_every": "4 steps",
            "min_update_interval": "1 steps",
        },
        {"kind": "token_select", "keep_ratio": 0.5},
    ],
}


@pytest.fixture(scope="module")
def folder_export(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A compacted export of a short run on digits written as PNG files (RGB), its data and
    the run's summary."""
    root = tmp_path_factory.mktemp("bench")
    data = digits_folder(root / "digits", per_class=8, val_per_class=4, size=16)
    run = root / "run"
    apply_on_folder(RECIPE, data, run)
    export = root / "export"
    result = runner.invoke(app, ["export", str(run), "--compact", "-o", str(export)])
    assert result.exit_code == 0, result.output
    return export, data, json.loads((run / "summary.json").read_text())


def test_bench_times_the_export_beside_its_dense_model(folder_export) -> None:
    export, _, _ = folder_export
    result = runner.invoke(
        app,
        ["bench", str(export), "--batch-size", "1", "--batch-size", "4", "--iters", "3",
         "--warmup", "1", "--threads", "1", "--json", "--no-onnx"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert [(t["backend"], t["batch"]) for t in record["timings"]] == [
        ("pytorch", 1),
        ("pytorch", 4),
    ]
    for t in record["timings"]:
        assert t["dense_ms"] > 0 and t["export_ms"] > 0
        assert t["ratio"] == pytest.approx(t["export_ms"] / t["dense_ms"])
    # Half the heads and neurons, half the tokens: the export costs well under dense.
    assert record["flops_ratio"] < 0.5 and record["params"]["export"] < record["params"]["dense"]


def test_bench_times_onnx_runtime_when_asked(folder_export) -> None:
    pytest.importorskip("onnxruntime")
    export, _, _ = folder_export
    result = runner.invoke(
        app, ["bench", str(export), "--batch-size", "2", "--iters", "2", "--warmup", "1",
              "--json", "--onnx"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    backends = [t["backend"] for t in json.loads(result.output)["timings"]]
    assert backends == ["pytorch", "onnxruntime"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "float16", "--device", "cpu"], "float16"),
        (["--dtype", "int4"], "--dtype 'int4'"),
        (["--batch-size", "100000"], "at most 4096"),
        (["--accelerate"], "--dtype float16"),
        (["--accelerate", "--dtype", "bfloat16", "--device", "cpu"], "marks no N:M-sparse layers"),
    ],
)
def test_bench_refuses_what_cannot_be_timed(folder_export, args, message) -> None:
    export, _, _ = folder_export
    result = runner.invoke(app, ["bench", str(export), "--no-onnx", *args])
    assert result.exit_code in (1, 2) and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_eval_reports_the_accuracy_training_measured(folder_export) -> None:
    """With the export's own preprocessing, its accuracy on the run's val/ images is the one
    the trainer measured there at the last epoch."""
    export, data, summary = folder_export
    result = runner.invoke(app, ["eval", str(export), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["images"] == 40 and record["data"] == str(data / "val")
    assert record["top1"] == pytest.approx(summary["val_acc"], abs=1e-9)
    assert 0 <= record["top5"] <= 1 and record["top5"] >= record["top1"]


def test_eval_refuses_a_folder_of_other_classes(folder_export, tmp_path: Path) -> None:
    export, _, _ = folder_export
    other = digits_folder(tmp_path / "d", per_class=1, val_per_class=1)
    for label in range(3, 10):
        for split in ("train", "val"):
            for image in (other / split / str(label)).iterdir():
                image.unlink()
            (other / split / str(label)).rmdir()
    result = runner.invoke(app, ["eval", str(export), "--data", str(other)])
    assert result.exit_code == 1
    assert "3 class folders, but the export predicts 10" in " ".join(result.output.split())
