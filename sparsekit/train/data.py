"""Data sources for the built-in trainer: an ImageFolder root, scikit-learn's digits, or synthetic.

`digits` is a real data set that ships with scikit-learn (1,797 8x8 handwritten digits, no
download), split train/val with a fixed seed; it makes a full run take minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sparsekit.errors import UsageError
from sparsekit.train.data_bundle import DataBundle

MAX_SYNTHETIC_SIZE = 512


class TensorImages(Dataset):
    """Images held in memory, resized on the fly, with a random shift when training.

    The shift draws from torch's global generator, which the trainer checkpoints, so a resumed
    run sees the same augmentation as an uninterrupted one.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, img_size: int, shift: int):
        self.images, self.labels = images, labels
        self.img_size, self.shift = img_size, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.shift:
            h, w = image.shape[-2:]
            padded = F.pad(image, (self.shift,) * 4)
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2,)).tolist()
            image = padded[:, dy : dy + h, dx : dx + w]
        if image.shape[-1] != self.img_size:
            image = F.interpolate(
                image[None],
                size=(self.img_size, self.img_size),
                mode="bilinear",
                align_corners=False,
            )[0]
        return image, self.labels[index]


def build_data(
    source: str,
    img_size: int | None = None,
    seed: int = 0,
    bad_images: str = "refuse",
    transforms: Callable[[int], tuple[Callable, Callable]] | None = None,
) -> DataBundle:
    """`digits`, `synthetic`, or a folder holding `train/` and `val/` ImageFolder trees.

    `bad_images` (folders only): `refuse` stops at the first unreadable image, naming it;
    `skip` checks every image once, up front, and leaves the unreadable ones out (listed in
    `DataBundle.skipped`). `transforms` (folders only): given the image size, the train and
    eval transforms (default: timm's defaults).
    """
    if source == "digits":
        return _digits(img_size or 8, seed)
    if source == "synthetic":
        if (img_size or 32) > MAX_SYNTHETIC_SIZE:  # it is held in memory: 320 images
            raise UsageError(
                f"--img-size {img_size}: --data synthetic makes images of at most "
                f"{MAX_SYNTHETIC_SIZE} px (it is a smoke test held in memory); give a smaller "
                "--img-size or an image folder."
            )
        return _synthetic(img_size or 32, seed)
    from sparsekit.train.image_folder import image_folder

    size = img_size or 224
    return image_folder(Path(source), size, bad_images, transforms(size) if transforms else None)


def _digits(img_size: int, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    mean, std = images[idx_train].mean(), images[idx_train].std()
    images = (images - mean) / std
    return DataBundle(
        name="digits",
        train=TensorImages(images[idx_train], labels[idx_train], img_size, shift=1),
        val=TensorImages(images[idx_val], labels[idx_val], img_size, shift=0),
        num_classes=10,
        in_chans=1,
        img_size=img_size,
        patch_size=4,
        in_memory=True,
    )


def _synthetic(img_size: int, seed: int, classes: int = 10) -> DataBundle:
    """Noisy copies of one random template per class: learnable, tiny, for smoke tests."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, img_size, img_size, generator=g)

    def make(n: int) -> TensorImages:
        labels = torch.randint(0, classes, (n,), generator=g)
        images = templates[labels] + 0.5 * torch.randn(n, 3, img_size, img_size, generator=g)
        return TensorImages(images, labels, img_size, shift=0)

    return DataBundle(
        "synthetic", make(256), make(64), classes, 3, img_size, patch_size=8, in_memory=True
    )
