"""`val_samples.safetensors`: the first few validation images of a token-selecting run, exactly
as the model sees them, so that the report's token map can be drawn later from the run folder
alone, with the selectors of the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from sparsekit.atomic import atomic_path
from sparsekit.run_folder.layout import SAMPLES_FILE

SAMPLE_COUNT = 6


def save_samples(folder: Path, dataset: Dataset, count: int = SAMPLE_COUNT) -> None:
    """Write the first `count` images of `dataset` (after its transform) into the run folder."""
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    with atomic_path(folder / SAMPLES_FILE) as tmp:
        save_file({"images": images.float().contiguous()}, str(tmp))


def read_samples(folder: Path) -> torch.Tensor | None:
    """The saved images (None when the run has none, or the file cannot be read)."""
    path = folder / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["images"]
    except (SafetensorError, OSError, KeyError):
        return None
