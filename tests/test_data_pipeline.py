"""The data pipeline as the reference trains it (timm's augmentation, mixup and cutmix,
repeated augmentation), drawn so that workers, processes and resumes change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import digits_folder
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.recipe import load_recipe
from sparsekit.recipe.data import Data
from sparsekit.run_folder.checkpoint import load_checkpoint
from sparsekit.train.distributed import Ranks
from sparsekit.train.epoch_order import EpochOrder
from sparsekit.train.mixing import BatchMixing

runner = CliRunner()


def test_the_epoch_order_is_the_seeded_permutation_cut_into_batches() -> None:
    order = EpochOrder(10, 4, Ranks(), seed=3)
    order.set_epoch(2)
    batches = list(order)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003 + 2))
    assert [i for b in batches for i, _, _ in b] == expected.tolist()
    assert [len(b) for b in batches] == [4, 4, 2]  # one process keeps the partial batch
    assert [p for b in batches for _, _, p in b] == list(range(10))
    assert {e for b in batches for _, e, _ in b} == {2}


@pytest.mark.parametrize("repeats", [1, 3])
def test_processes_share_every_global_batch(repeats: int) -> None:
    """Two processes train on the global batches of one process, keys included."""
    one = EpochOrder(50, 8, Ranks(), seed=0, repeats=repeats, drop_last=True)
    two = [EpochOrder(50, 8, Ranks(r, 2), seed=0, repeats=repeats) for r in range(2)]
    for order in (one, *two):
        order.set_epoch(5)
    for whole, a, b in zip(one, *two, strict=True):
        assert a + b == whole
    assert len(one) == 6


def test_repeated_augmentation_keeps_an_image_s_copies_in_one_global_batch() -> None:
    order = EpochOrder(96, 24, Ranks(), seed=1, repeats=3)
    order.set_epoch(0)
    batches = list(order)
    assert sum(map(len, batches)) == 96  # an epoch keeps the data set's length
    seen = [i for batch in batches for i, _, _ in batch]
    assert len(set(seen)) == 32  # a third of the images, three times each
    for batch in batches:
        indices = [i for i, _, _ in batch]
        assert all(indices.count(i) == 3 for i in indices)
        # Shuffled within the batch: copies are not all neighbours (mixup pairs neighbours).
        assert sum(indices[k] == indices[k + 1] for k in range(0, 24, 2)) < 12
    keys = [(e, p) for batch in batches for _, e, p in batch]
    assert len(set(keys)) == 96  # each copy is augmented under its own key


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixing_is_the_same_at_any_number_of_processes(mode: str) -> None:
    data = Data(mixup=0.8, cutmix=1.0, mixup_mode=mode)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 5
    whole = BatchMixing(data, 5, 0.1, seed=7, first_position=0)(images, labels, step=11)
    parts = [
        BatchMixing(data, 5, 0.1, seed=7, first_position=4 * r)(
            images[4 * r : 4 * r + 4], labels[4 * r : 4 * r + 4], step=11
        )
        for r in range(2)
    ]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert not torch.equal(whole[0], images)  # it mixed
    assert torch.allclose(whole[1].sum(1), torch.ones(8))
    again = BatchMixing(data, 5, 0.1, seed=7, first_position=0)(images, labels, step=12)
    assert not torch.equal(again[0], whole[0])  # another step draws anew


def test_mixup_mixes_each_image_with_its_neighbour_as_timm_does() -> None:
    """Mixup alone, one draw per batch: image 2k and 2k+1 are blended by the same lambda, and
    the soft target carries the labels in that proportion, smoothed as timm smooths them."""
    images = torch.randn(6, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, targets = BatchMixing(Data(mixup=0.8), 5, 0.1, seed=0, first_position=0)(
        images, labels, step=0
    )
    lam = ((mixed[0] - images[1]) / (images[0] - images[1])).flatten()[0].item()
    assert 0 < lam < 1
    for k in range(0, 6, 2):
        assert torch.allclose(mixed[k], lam * images[k] + (1 - lam) * images[k + 1], atol=1e-5)
        assert torch.allclose(mixed[k + 1], lam * images[k + 1] + (1 - lam) * images[k], atol=1e-5)
    own = 1 - 0.1 + 0.1 / 5
    assert targets[0, 0].item() == pytest.approx(lam * own + (1 - lam) * 0.02, abs=1e-5)
    assert targets[0, 1].item() == pytest.approx((1 - lam) * own + lam * 0.02, abs=1e-5)


def test_mixup_refuses_an_odd_batch_in_the_recipe_and_an_odd_share_at_run_time(
    tmp_path: Path,
) -> None:
    from sparsekit.errors import SparsekitError
    from sparsekit.train.data import build_data
    from sparsekit.train.trainer import make_mixing

    recipe = tmp_path / "odd.yaml"
    recipe.write_text(
        "name: odd\ntraining: {epochs: 1, batch_size: 15, schedule: {warmup: 0}}\n"
        "data:\n  mixup: 0.8\n"
    )
    result = runner.invoke(
        app, ["apply", str(recipe), "--model", "deit_tiny", "--output", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "data.mixup (line 4)" in message and "mix images in pairs" in message
    assert not (tmp_path / "o").exists()
    six = load_recipe({"name": "six", "training": {"batch_size": 6}, "data": {"mixup": 0.8}})
    with pytest.raises(SparsekitError, match="multiple of 4"):
        make_mixing(six, build_data("digits"), Ranks(1, 2))  # 3 images per process


def test_bad_mixing_fields_are_named_with_their_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\ndata:\n  mixup: -1\n  mixup_mode: rows\n")
    result = runner.invoke(app, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 2  # an invalid recipe is a usage error
    assert "line 3" in result.output and "line 4" in result.output


PIPELINE = {
    "name": "pipeline",
    "training": {
        "epochs": 3,
        "batch_size": 16,
        "accumulate": 2,
        "ema": {"decay": 0.9},
        "drop_path": 0.1,
        "schedule": {"warmup": 1},
        "optimizer": {"lr": 1e-3},
    },
    "data": {
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "reprob": 0.25,
        "mixup": 0.8,
        "cutmix": 1.0,
        "repeated_aug": 3,
    },
    "phases": [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "4 steps",
            "min_update_interval": "1 steps",
        },
    ],
}
MODEL = ["--model", "deit_tiny", "--img-size", "16", "--patch-size", "8",
         "--model-arg", "depth=2"]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits") / "data")


def apply(recipe: Path, data: Path, out: Path, *extra: str) -> str:
    result = runner.invoke(
        app, ["apply", str(recipe), *MODEL, "--data", str(data), "--output", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_the_full_pipeline_resumes_bit_exactly_with_any_number_of_workers(
    tmp_path: Path, digits: Path
) -> None:
    """RandAugment, random erasing, mixup and cutmix, repeated augmentation, accumulation, an
    EMA and stochastic depth on real images: a run with 2 persistent workers, stopped and
    resumed, ends where an uninterrupted run without workers ends, to the bit (weights, EMA,
    masks), and keeps its best checkpoint."""
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump(PIPELINE))
    apply(recipe, digits, tmp_path / "straight", "--workers", "0")
    apply(recipe, digits, tmp_path / "split", "--workers", "2", "--stop-after-epoch", "1")
    apply(recipe, digits, tmp_path / "split", "--workers", "2", "--resume")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key
    masks = a["session"]["modifiers"][0]["state"]["masks"]
    for key, mask in masks.items():
        assert torch.equal(mask, b["session"]["modifiers"][0]["state"]["masks"][key]), key
    epochs = [
        json.loads(line)
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
        if '"event": "epoch"' in line
    ]
    # 120 images, three copies each in an epoch of 120, 16 per step: 7 steps (the last,
    # partial batch dropped, since images are mixed in pairs).
    assert [e["steps_in_epoch"] for e in epochs] == [7, 7, 7]
    assert (tmp_path / "straight" / "checkpoint-best.pt").exists()
    assert all("ema_val_acc" in e for e in epochs)
    for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines():
        assert json.loads(line) == json.loads(line)  # whole lines only


def test_two_processes_train_the_full_pipeline_as_one(tmp_path: Path, digits: Path) -> None:
    """torchrun with 2 CPU processes: the same augmentation, mixing, repeated images and so
    the same decisions (masks) as one process with the same global batch."""
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(
        yaml.safe_dump({**PIPELINE, "training": {**PIPELINE["training"], "epochs": 2}})
    )
    apply(recipe, digits, tmp_path / "one")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "sparsekit", "apply", str(recipe), *MODEL, "--data", str(digits),
        "--output", str(tmp_path / "two"), "--workers", "1",
    ]  # fmt: skip
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    masks_one = one["session"]["modifiers"][0]["state"]["masks"]
    masks_two = two["session"]["modifiers"][0]["state"]["masks"]
    assert masks_one.keys() == masks_two.keys()
    for key, mask in masks_one.items():
        assert torch.equal(mask, masks_two[key]), key
    # DDP adds gradients up in another order; AdamW carries the rounding (about 1e-4 here).
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], atol=1e-3), key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_default_to_none_in_memory_and_some_for_folders(digits: Path) -> None:
    from sparsekit.train.data import build_data
    from sparsekit.train.trainer import loader_workers

    assert loader_workers(None, build_data("digits")) == 0
    assert loader_workers(3, build_data("digits")) == 3
    assert 1 <= loader_workers(None, build_data(str(digits), 16)) <= 8


def test_the_saved_recipe_keeps_the_data_section(tmp_path: Path) -> None:
    recipe = load_recipe(PIPELINE)
    assert recipe.data.mixes and recipe.data.repeated_aug == 3
    assert not load_recipe({"name": "plain"}).data.mixes


def test_randaugment_s_zero_bit_posterize_gives_black_instead_of_stopping_the_run() -> None:
    """rand-m9-mstd0.5-inc1 reaches posterize with 0 bits (seed 483 here), which Pillow 13
    refuses; the transform gives the black image timm gave with earlier Pillow, and pickles."""
    import pickle
    import random

    import numpy as np
    from PIL import Image

    from sparsekit.train.transforms import folder_transforms

    train, _, _ = folder_transforms(
        Data(auto_augment="rand-m9-mstd0.5-inc1"), "deit_tiny_patch16_224", 16
    )
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    for seed in range(600):
        random.seed(seed)
        np.random.seed(seed)
        train(image)
    pickle.loads(pickle.dumps(train))


def test_the_shipped_imagenet_recipes_carry_the_reference_s_pipeline() -> None:
    """DeiT's main.py defaults, which the SViTE code keeps, in every ImageNet recipe."""
    root = Path(__file__).resolve().parents[1] / "recipes"
    files = [
        f
        for f in sorted(root.glob("*.yaml")) + sorted((root / "paper").glob("*.yaml"))
        if f.stem not in ("svite_plus_digits", "dense_warmup_dst_example", "finetune_export")
    ]
    assert len(files) == 15
    for file in files:
        recipe = load_recipe(file)
        data, training = recipe.data, recipe.training
        assert (data.auto_augment, data.color_jitter, data.interpolation) == (
            "rand-m9-mstd0.5-inc1",
            0.4,
            "bicubic",
        ), file
        assert (data.reprob, data.remode, data.mixup, data.cutmix) == (0.25, "pixel", 0.8, 1.0)
        assert (data.mixup_prob, data.mixup_switch_prob, data.mixup_mode) == (1.0, 0.5, "batch")
        assert data.repeated_aug == 3 and training.ema.decay == 0.99996, file
        assert training.optimizer.lr == 5e-4 and training.optimizer.lr_scaling == "linear"
        assert training.peak_lr == pytest.approx(5e-4 * training.batch_size / 512), file
