"""Which patches the token selectors keep on a few validation images: the report's token map.

A token-selecting run keeps the first few validation images, exactly as the model sees them, in
its folder (`val_samples.safetensors`), so the map can be drawn later from the run folder alone,
with the selectors of the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from sparsekit.atomic import atomic_path

SAMPLES_FILE = "val_samples.safetensors"
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


@torch.no_grad()
def selectors_passed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """For each image and patch (row-major over the patch grid), how many of the model's token
    selectors kept it: 0 = dropped by the first, len(placements) = kept to the end.

    Args:
        model: an eval-mode model with its `token_selection` installed (as `baked_model` or
            `load_compact` returns it).
    """
    selection = model.token_selection
    selection.trace = []
    try:
        model(images)
        trace = selection.trace
    finally:
        selection.trace = None
    count, patches = images.shape[0], model.patch_embed.num_patches
    positions = torch.arange(patches).expand(count, -1)
    passed = torch.zeros(count, patches, dtype=torch.long)
    for index in trace:  # each selection indexes the patches the previous one kept
        positions = positions.gather(1, index.cpu())
        passed.scatter_add_(1, positions, torch.ones_like(positions))
    return passed
