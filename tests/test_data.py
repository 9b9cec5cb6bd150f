"""Data sources: digits (real, bundled), synthetic, and ImageFolder roots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sparsekit.errors import SparsekitError
from sparsekit.train.data import build_data


def test_digits_split_is_fixed_and_stratified() -> None:
    a, b = build_data("digits"), build_data("digits")
    assert (len(a.train), len(a.val)) == (1437, 360)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels).min() >= 35  # every digit present in validation
    image, label = a.val[0]
    assert image.shape == (1, 8, 8) and 0 <= int(label) < 10
    assert (a.num_classes, a.in_chans, a.img_size, a.patch_size) == (10, 1, 8, 4)


def test_digits_resize_and_training_shift() -> None:
    data = build_data("digits", img_size=16)
    assert data.train[0][0].shape == (1, 16, 16)
    torch.manual_seed(0)
    views = {tuple(data.train[3][0].flatten().tolist()) for _ in range(20)}
    assert len(views) > 1  # random shifts when training
    assert len({tuple(data.val[3][0].flatten().tolist()) for _ in range(5)}) == 1


def make_folder(root: Path, split: str, classes: list[str], n: int = 3) -> None:
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(n):
            color = (40 * c + 10 * i, 100, 200 - 30 * c)
            Image.new("RGB", (40, 30), color).save(root / split / name / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog"], n=2)
    data = build_data(str(tmp_path), img_size=32)
    assert (len(data.train), len(data.val), data.num_classes, data.in_chans) == (6, 4, 2, 3)
    image, label = data.val[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)
    assert data.patch_size is None


def test_image_folder_errors(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    with pytest.raises(SparsekitError, match="val is missing"):
        build_data(str(tmp_path))
    make_folder(tmp_path, "val", ["cat"])
    with pytest.raises(SparsekitError, match="same class folders"):
        build_data(str(tmp_path))
