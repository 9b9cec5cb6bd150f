"""End-to-end runs of the built-in trainer and the CLI (small real models, synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.recipe import load_recipe
from sparsekit.run_folder.checkpoint import load_checkpoint
from sparsekit.train.trainer import RunConfig, train

runner = CliRunner()
# A real timm ViT cut to 2 blocks, on synthetic data, for 2 epochs: an end-to-end run in seconds.
TINY_RUN = [
    "--model",
    "vit_tiny_patch16_224",
    "--data",
    "synthetic",
    "--model-arg",
    "depth=2",
    "--epochs",
    "2",
]
SMALL_MODEL = {"depth": 2}
RECIPE = {
    "name": "e2e",
    "training": {
        "epochs": 3,
        "batch_size": 32,
        "drop_path": 0.1,
        "schedule": {"warmup": 1},
        "optimizer": {"lr": 1e-3},
    },
    "phases": [
        {"kind": "dense_warmup", "end": 1},
        {
            "kind": "unstructured_dst",
            "start": 1,
            "sparsity": 0.7,
            "update_every": "3 steps",
            "min_update_interval": "1 steps",
            "end": "100%",
            "init": "magnitude",
            "grow_accumulation": 2,
        },
    ],
}


def run(tmp_path: Path, name: str, **kwargs) -> dict:
    config = RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=tmp_path / name,
        extra=SMALL_MODEL,
        **kwargs,
    )
    return train(load_recipe(dict(RECIPE)), config)


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    full = run(tmp_path, "full")
    stopped = run(tmp_path, "split", stop_after_epoch=2)
    assert stopped == {"stopped_at_epoch": 2}
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"event": "epoch", "epo')  # a line torn by a crash mid-append
    resumed = run(tmp_path, "split", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    masks_a = a["session"]["modifiers"][1]["state"]["masks"]
    masks_b = b["session"]["modifiers"][1]["state"]["masks"]
    assert masks_a.keys() == masks_b.keys()
    for key in masks_a:
        assert torch.equal(masks_a[key], masks_b[key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert full["val_acc"] == resumed["val_acc"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines if '"event": "epoch"' in ln] == [1, 2, 3]


def test_run_folder_contents(tmp_path: Path) -> None:
    summary = run(tmp_path, "r")
    out = tmp_path / "r"
    assert {p.name for p in out.iterdir()} == {
        ".sparsekit-run",  # the marker that makes it a run folder (and its lock)
        "recipe.yaml",
        "run.json",
        "checkpoint.pt",
        "checkpoint-best.pt",  # the epoch of the best validation accuracy
        "metrics.jsonl",
        "metrics.csv",  # the epoch lines' scalars (no tensorboard/: --tensorboard not given)
        "summary.json",
    }
    assert load_recipe(out / "recipe.yaml") == load_recipe(dict(RECIPE))
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    sp = saved["sparsity"]
    assert sp["masked_kept"] == round(0.3 * sp["masked_params"])
    assert abs(sp["global_sparsity"] - 0.7) < 1e-6
    assert all(0 < layer["sparsity"] < 1 for layer in sp["layers"].values())
    # Weights really are zero where masks say so: the non-zero count reflects the pruning.
    assert sp["nonzero_params"] <= sp["total_params"] - (sp["masked_params"] - sp["masked_kept"])
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if r["event"] == "mask_update"]
    assert [r["step"] for r in records if r["event"] == "mask_init"] == [8]
    assert updates and all((r["step"] - 8) % 3 == 0 for r in updates)  # start: epoch 1 = step 8
    assert [r["sparsity"] for r in records if r["event"] == "epoch"] == pytest.approx([0, 0.7, 0.7])
    assert saved["val_acc"] > 0.3  # synthetic classes are learnable: well above chance (0.1)


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    run(tmp_path, "r", stop_after_epoch=1)
    from sparsekit.errors import SparsekitError

    with pytest.raises(SparsekitError, match="already holds a run"):
        run(tmp_path, "r")
    with pytest.raises(SparsekitError, match="differs from the recipe"):
        config = RunConfig(
            model="vit_tiny_patch16_224",
            data="synthetic",
            output=tmp_path / "r",
            extra=SMALL_MODEL,
            resume=True,
        )
        train(load_recipe(dict(RECIPE), ["training.epochs=4"]), config)


def write_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_cli_apply_end_to_end(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "apply",
            str(write_recipe(tmp_path)),
            *TINY_RUN,
            "--set",
            "phases[1].sparsity=0.5",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "val accuracy" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert abs(summary["sparsity"]["global_sparsity"] - 0.5) < 1e-6
    assert summary["epochs"] == 2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "deit_smal"], 1, "unknown model"),
        (["--model", "resnet18"], 1, "not supported"),
        (["--model", "deit_tiny", "--set", "phases[1].sparsity=2"], 2, "from --set"),
        (["--model", "deit_tiny", "--data", "/nonexistent"], 1, "ImageFolder"),
        (["--model", "deit_tiny", "--model-arg", "depth"], 1, "KEY=VALUE"),
        (["--model", "deit_tiny", "--resume"], 1, "no checkpoint.pt"),
        (["--model", "deit_tiny", "--checkpoint", "w.pt"], 1, "safetensors"),
    ],
)
def test_cli_apply_errors(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = runner.invoke(
        app, ["apply", str(write_recipe(tmp_path)), "--output", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_cli_recipe_commands(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 0 and "valid recipe" in result.output
    result = runner.invoke(
        app, ["recipe", "show", str(path), "--dataset-size", "256", "--batch-size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "unstructured_dst" in result.output and "8 -> 24" in result.output  # steps
    result = runner.invoke(app, ["recipe", "schema"])
    assert result.exit_code == 0 and json.loads(result.output)["title"] == "Recipe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining:\n  epochs: -3\n")
    result = runner.invoke(app, ["recipe", "validate", str(bad)])
    assert result.exit_code == 2 and "training.epochs (line 3)" in result.output


def test_cli_apply_from_local_weights(tmp_path: Path) -> None:
    from sparsekit.models import ModelSpec, create_model

    spec = ModelSpec(
        "vit_tiny_patch16_224",
        {"num_classes": 10, "in_chans": 3, "img_size": 32, "patch_size": 8, "depth": 2},
    )
    weights = tmp_path / "w.safetensors"
    save_file(create_model(spec).state_dict(), str(weights))
    result = runner.invoke(
        app,
        [
            "apply",
            str(write_recipe(tmp_path)),
            *TINY_RUN,
            "--checkpoint",
            str(weights),
            "--output",
            str(tmp_path / "w"),
            "--stop-after-epoch",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    import sparsekit.train.trainer as trainer
    from sparsekit.errors import SparsekitError

    run(tmp_path, "nan", stop_after_epoch=1)

    class Exploding(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            return super().forward(logits, labels) * float("nan")

    monkeypatch.setattr(trainer.nn, "CrossEntropyLoss", Exploding)
    with pytest.raises(
        SparsekitError, match="the loss became nan at step .* checkpoint of epoch 1"
    ):
        run(tmp_path, "nan", resume=True)
    assert load_checkpoint(tmp_path / "nan" / "checkpoint.pt")["epoch"] == 1


def test_non_finite_losses_can_be_skipped(tmp_path: Path, monkeypatch) -> None:
    import sparsekit.train.trainer as trainer
    from sparsekit.errors import SparsekitError

    calls = {"n": 0}

    class Sometimes(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            calls["n"] += 1
            loss = super().forward(logits, labels)
            return loss * float("nan") if calls["n"] % 4 == 0 else loss

    monkeypatch.setattr(trainer.nn, "CrossEntropyLoss", Sometimes)
    recipe = dict(RECIPE, training={**RECIPE["training"], "nonfinite_loss": "skip"})
    config = RunConfig(
        model="vit_tiny_patch16_224", data="synthetic", output=tmp_path / "skip", extra=SMALL_MODEL
    )
    summary = train(load_recipe(recipe), config)
    skipped = [
        json.loads(line)
        for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
        if "skipped_step" in line
    ]
    assert len(skipped) == calls["n"] // 4 and summary["steps"] == 3 * 8

    class Always(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            return super().forward(logits, labels) * float("inf")

    monkeypatch.setattr(trainer.nn, "CrossEntropyLoss", Always)
    config = RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=tmp_path / "always",
        extra=SMALL_MODEL,
    )
    with pytest.raises(SparsekitError, match="11 steps in a row"):
        train(load_recipe(recipe), config)


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    from PIL import Image

    from sparsekit.errors import SparsekitError
    from sparsekit.train.data import build_data

    for split in ("train", "val"):
        folder = tmp_path / "images" / split / "cat"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "fine.png")
    (tmp_path / "images" / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    data = build_data(str(tmp_path / "images"), img_size=32)
    with pytest.raises(SparsekitError, match="broken.png"):
        [data.train[i] for i in range(len(data.train))]
    # Or skipped and counted, when asked.
    data = build_data(str(tmp_path / "images"), img_size=32, bad_images="skip")
    assert len(data.train) == 1 and [Path(p).name for p in data.skipped] == ["broken.png"]
    assert data.train[0][0].shape == (3, 32, 32)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    from sparsekit.errors import SparsekitError
    from sparsekit.run_folder.checkpoint import save_checkpoint

    run(tmp_path, "other", stop_after_epoch=1)
    path = tmp_path / "other" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["model"] = {"not.a.weight": torch.zeros(2)}  # written by something else entirely
    del ckpt["format"]
    save_checkpoint(path, ckpt)
    with pytest.raises(SparsekitError, match="does not fit this run"):
        run(tmp_path, "other", resume=True)


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sparsekit.train.trainer.train", interrupted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = runner.invoke(app, ["apply", str(recipe), *TINY_RUN, "--output", str(tmp_path / "c")])
    assert result.exit_code == 130
    assert "--resume" in result.output and "Traceback" not in result.output


def image_folder(root: Path, broken: bool = False) -> Path:
    """train/ and val/ with one class of a few real PNGs (and one unreadable file)."""
    from PIL import Image

    for split in ("train", "val"):
        folder = root / split / "cat"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_in_the_first_epoch_does_not_advise_resume(
    tmp_path: Path, workers: int
) -> None:
    """No checkpoint exists yet: the advice is to run again, and a worker's error reads the
    same as the main process's (one paragraph, no worker traceback)."""
    data = image_folder(tmp_path / "images", broken=True)
    result = runner.invoke(
        app,
        ["apply", str(write_recipe(tmp_path)), "--model", "vit_tiny_patch16_224", "--model-arg",
         "depth=1", "--data", str(data), "--img-size", "16", "--patch-size", "8",
         "--batch-size", "2", "--workers", str(workers), "--output", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert "cannot read the image" in message and "broken.png" in message
    assert "run the same command again: no epoch has finished" in message
    assert "--resume" not in message
    assert "Traceback" not in message and "worker" not in message
    assert message.count("error:") == 1


def test_an_unreadable_image_after_a_checkpoint_advises_resume(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "images")
    base = ["apply", str(write_recipe(tmp_path)), "--model", "vit_tiny_patch16_224",
            "--model-arg", "depth=1", "--data", str(data), "--img-size", "16", "--patch-size",
            "8", "--batch-size", "4", "--output", str(tmp_path / "o")]  # fmt: skip
    assert runner.invoke(app, [*base, "--stop-after-epoch", "1"]).exit_code == 0
    (data / "train" / "cat" / "0.png").write_bytes(b"damaged since")
    result = runner.invoke(app, [*base, "--resume"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "0.png" in message, result.output
    assert "continue with --resume: the run folder's checkpoint holds epoch 1" in message


def test_a_non_finite_loss_at_the_first_step_does_not_point_to_a_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    import sparsekit.train.trainer as trainer
    from sparsekit.errors import SparsekitError

    class Exploding(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            return super().forward(logits, labels) * float("nan")

    monkeypatch.setattr(trainer.nn, "CrossEntropyLoss", Exploding)
    with pytest.raises(SparsekitError) as err:
        run(tmp_path, "first")
    assert "at step 0 (epoch 1)" in str(err.value)
    assert "no epoch has finished" in str(err.value) and "--resume" not in str(err.value)
    assert "epoch 0" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--img-size", "0"], "greater than or equal to 1"),
        (["--patch-size", "0"], "greater than or equal to 1"),
        (["--img-size", "-3"], "greater than or equal to 1"),
        (["--workers", "-1"], "greater than or equal to 0"),
        (["--stop-after-epoch", "0"], "greater than or equal to 1"),
        (["--device", "foo"], "--device 'foo'"),
        (["--device", "meta"], "other device types are not supported"),
        (["--device", "mps"], "other device types are not supported"),
        (["--img-size", "16", "--patch-size", "32"], "larger than --img-size 16"),
        (["--patch-size", "64"], "larger than the image size 32"),
        (["--model-arg", "num_classes=0"], "the data decides it"),
        (["--model-arg", "img_size=64"], "use --img-size"),
        (["--workers", "1000000"], "at most 256"),
        (["--set", "training.epochs=!!timestamp abc"], "not valid YAML"),
        (["--output", "out\x00x"], "null byte"),  # click refuses it for a path
        (["--model", "vit\x00"], "NUL character"),
    ],
)
def test_options_that_can_never_work_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(
        app,
        ["apply", str(write_recipe(tmp_path)), *TINY_RUN, "--output", str(tmp_path / "o"), *args],
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())  # click's box unwrapped
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # nothing was created for a run that never started


def test_a_refused_model_leaves_no_run_folder(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["apply", str(write_recipe(tmp_path)), *TINY_RUN, "--model-arg", "embed_dim=7",
         "--output", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 1 and "dim should be divisible by num_heads" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_training_steps_read_the_device_only_at_logging_intervals(
    tmp_path: Path, monkeypatch, mode: str
) -> None:
    """The trainer leaves each step's loss and accuracy on the device and reads them (one
    CPU-GPU synchronisation) at logging intervals and the end of the epoch; `skip` alone reads
    every step's loss, to decide before the backward pass."""
    import sys

    import sparsekit.train.nonfinite as nonfinite
    import sparsekit.train.trainer as trainer

    readers: list[str] = []  # the trainer's functions that read a tensor back to the CPU
    loop_files = {trainer.__file__, nonfinite.__file__}

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename in loop_files:
                readers.append(caller.co_name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    monkeypatch.setattr(trainer, "LOG_EVERY", 3)  # 8 steps an epoch: logged at 3, 6 and 8
    recipe = dict(RECIPE, training={**RECIPE["training"], "nonfinite_loss": mode})
    config = RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=tmp_path / mode,
        extra=SMALL_MODEL,
        stop_after_epoch=1,
    )
    train(load_recipe(recipe), config)
    per_step = {"stop": set(), "skip": {"all_finite"}}[mode]
    assert set(readers) <= {"read", "check"} | per_step, readers
    assert readers.count("check") == (3 if mode == "stop" else 0)
    assert readers.count("all_finite") == (8 if mode == "skip" else 0)
    # The progress line reads the sums 3 times, the epoch's metrics and evaluation once each.
    assert readers.count("read") == 2 * (3 + 1 + 1)


def test_an_image_folder_run_uses_the_recipes_data_section(tmp_path: Path) -> None:
    """The trainer builds an image folder's transforms from the recipe's `data` section, the
    rest from the model's pretrained config (ViT: bicubic, mean and std 0.5), and says so."""
    data = image_folder(tmp_path / "images")
    recipe = {**RECIPE, "data": {"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}}
    path = tmp_path / "augmented.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(
        app,
        ["apply", str(path), "--model", "vit_tiny_patch16_224", "--model-arg", "depth=1",
         "--data", str(data), "--img-size", "16", "--patch-size", "8", "--batch-size", "4",
         "--output", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert (
        "images: rand-m9-mstd0.5-inc1, bicubic, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in line
    )
    saved = load_recipe(tmp_path / "o" / "recipe.yaml")
    assert saved.data.auto_augment == "rand-m9-mstd0.5-inc1" and saved.data.reprob == 0.25


def test_linear_lr_scaling_sets_the_peak_the_optimizer_reaches() -> None:
    from helpers import tiny_vit

    from sparsekit.timeline import Timeline
    from sparsekit.train.trainer import make_optimizer, make_scheduler

    recipe = load_recipe(
        {
            "name": "scaled",
            "training": {
                "epochs": 2,
                "batch_size": 1024,
                "optimizer": {"lr": 5e-4, "lr_scaling": "linear"},
                "schedule": {"warmup": "2 steps", "warmup_lr": 0.0},
            },
        }
    )
    optimizer = make_optimizer(tiny_vit(), recipe.training)
    scheduler = make_scheduler(optimizer, recipe.training, Timeline(2, 10))
    for _ in range(2):  # to the end of the warm-up: the peak
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # 5e-4 x 1024 / 512


def test_accumulated_steps_train_as_whole_batches(tmp_path: Path) -> None:
    """`training.accumulate` splits each step's batch into micro-batches; with no random layers
    the optimizer steps, the prune/grow decisions and the logged sums are those of whole
    batches (to float rounding), and the step count is the same."""
    results = {}
    for parts in (1, 4):
        recipe = load_recipe(
            {**RECIPE, "training": {**RECIPE["training"], "drop_path": 0.0, "epochs": 2}},
            [f"training.accumulate={parts}"],
        )
        run = RunConfig(
            model="vit_tiny_patch16_224", data="synthetic", img_size=16, patch_size=8,
            output=tmp_path / f"acc{parts}", device="cpu",
            extra={"depth": 2, "embed_dim": 48, "num_heads": 3},
        )  # fmt: skip
        train(recipe, run)
        records = [
            json.loads(line) for line in (run.output / "metrics.jsonl").read_text().splitlines()
        ]
        weights = load_checkpoint(run.output / "checkpoint.pt")["model"]
        results[parts] = (records, weights)
    (whole, whole_w), (split, split_w) = results[1], results[4]
    epochs = [r for r in whole if r["event"] == "epoch"]
    split_epochs = [r for r in split if r["event"] == "epoch"]
    assert [r["step"] for r in epochs] == [r["step"] for r in split_epochs]
    for a, b in zip(epochs, split_epochs, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["train_acc"] == a["train_acc"] and b["val_acc"] == a["val_acc"]
    updates = [(r["step"], r.get("regrown")) for r in whole if r["event"] == "mask_update"]
    assert updates and updates == [
        (r["step"], r.get("regrown")) for r in split if r["event"] == "mask_update"
    ]
    for name, tensor in whole_w.items():
        torch.testing.assert_close(split_w[name], tensor, rtol=1e-3, atol=1e-4)  # Adam: ~1e-5


def test_accumulate_is_checked_against_the_batch_and_skip() -> None:
    from sparsekit.errors import RecipeError

    with pytest.raises(RecipeError, match="micro-batch holds at least one image"):
        load_recipe(RECIPE, ["training.accumulate=64"])
    with pytest.raises(RecipeError, match="nonfinite_loss: skip decides before the backward"):
        load_recipe(RECIPE, ["training.accumulate=2", "training.nonfinite_loss=skip"])


@pytest.mark.parametrize("compute", ["active", "masked"])
def test_compiled_training_is_the_eager_training(tmp_path: Path, compute: str) -> None:
    """`training.compile` runs the steps through torch.compile: with weight and token
    sparsity, in both compute modes, the run logs the eager run's numbers (to float rounding)
    and ends with the eager run's masks."""
    recipe = {
        "name": "compiled",
        "training": {"epochs": 2, "batch_size": 16, "drop_path": 0.0, "compute": compute,
                     "schedule": {"warmup": 0}},
        "phases": [
            {"kind": "unstructured_dst", "sparsity": 0.5, "update_every": "3 steps",
             "min_update_interval": "1 steps"},
            {"kind": "token_select", "keep_ratio": 0.5, "temperature_start": 1.0},
        ],
    }  # fmt: skip
    runs = {}
    for compiled in (False, True):
        run = RunConfig(
            model="vit_tiny_patch16_224", data="synthetic", img_size=16, patch_size=8,
            output=tmp_path / f"{compute}-{compiled}", device="cpu",
            extra={"depth": 2, "embed_dim": 48, "num_heads": 4, "global_pool": "avg"},
        )  # fmt: skip
        train(load_recipe(recipe, [f"training.compile={str(compiled).lower()}"]), run)
        runs[compiled] = [
            json.loads(line) for line in (run.output / "metrics.jsonl").read_text().splitlines()
        ]
    eager, compiled = runs[False], runs[True]
    assert [r["event"] for r in eager] == [r["event"] for r in compiled]
    for a, b in zip(eager, compiled, strict=True):
        if a["event"] == "epoch":
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
            assert b["val_acc"] == a["val_acc"]
        if a["event"] == "mask_update":
            assert b["regrown"] == a["regrown"]
    final = [
        load_checkpoint(tmp_path / f"{compute}-{c}" / "checkpoint.pt")["session"]
        for c in (False, True)
    ]
    masks = [s["modifiers"][0]["state"]["masks"] for s in final]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_compile_refuses_a_phase_it_cannot_train() -> None:
    from sparsekit.errors import RecipeError

    recipe = {"name": "c", "phases": [{"kind": "head_prune_grow", "head_density": 0.5}]}
    with pytest.raises(RecipeError, match=r"head_prune_grow\) cannot train under compile"):
        load_recipe(recipe, ["training.compile=true"])
