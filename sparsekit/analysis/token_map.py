"""Which patches the token selectors keep on a few validation images: the report's token map.

The images are the ones a token-selecting run keeps in its folder
(`sparsekit.run_folder.samples`); the selectors are those of the run's last checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.surgery.geometry import patch_count
from sparsekit.surgery.tokens import selection_of


@torch.no_grad()
def selectors_passed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """For each image and patch (row-major over the patch grid), how many of the model's token
    selectors kept it: 0 = dropped by the first, len(placements) = kept to the end.

    Args:
        model: an eval-mode model with its token selection installed (as `baked_model` or
            `load_compact` returns it).
    """
    selection = selection_of(model)
    selection.trace = []
    try:
        model(images)
        trace = selection.trace
    finally:
        selection.trace = None
    count, patches = images.shape[0], patch_count(model)
    positions = torch.arange(patches).expand(count, -1)
    passed = torch.zeros(count, patches, dtype=torch.long)
    for index in trace:  # each selection indexes the patches the previous one kept
        positions = positions.gather(1, index.cpu())
        passed.scatter_add_(1, positions, torch.ones_like(positions))
    return passed
