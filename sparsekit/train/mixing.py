"""Mixup and cutmix (timm's `Mixup`), drawn so that any number of processes mixes alike.

timm's Mixup pairs image i of a batch with image n-1-i and draws from NumPy's global
generator: under DDP each process would pair and draw within its own share, so the global
batch, and every decision trained on it, would depend on the number of processes. Here an
image is paired with its neighbour in the global batch (positions 2k and 2k+1, always in one
process's share, since shares are even), and the draws are keyed: by (seed, step) for
`mixup_mode: batch` (one draw for the whole global batch, as the reference), by (seed, step,
pair) for `pair` and by (seed, step, image) for `elem`. Each share is laid out so that timm's
own pairing meets those neighbours, and timm's code does the mixing and the soft targets.
"""

from __future__ import annotations

import torch

from sparsekit.errors import SparsekitError
from sparsekit.recipe.data import Data
from sparsekit.train.keyed_random import keyed_random


class BatchMixing:
    """Mix this process's share of a global batch: (images, labels, step) -> (images, soft
    targets), both in the order the share came in."""

    def __init__(
        self,
        data: Data,
        num_classes: int,
        label_smoothing: float,
        seed: int,
        first_position: int,
    ):
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=data.mixup,
            cutmix_alpha=data.cutmix,
            cutmix_minmax=list(data.cutmix_minmax) if data.cutmix_minmax else None,
            prob=data.mixup_prob,
            switch_prob=data.mixup_switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.mode, self.seed = data.mixup_mode, seed
        self.first_position = first_position  # of this share in the global batch (even)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(images)
        if count % 2:
            raise SparsekitError(
                f"mixup and cutmix mix images in pairs, but a batch share of {count} images is "
                "odd; make training.batch_size a multiple of twice the number of processes."
            )
        # Evens, then odds backwards: flip(0) of this layout pairs 2k with 2k+1.
        layout = torch.cat([torch.arange(0, count, 2), torch.arange(1, count, 2).flip(0)])
        x = images[layout.to(images.device)].clone()
        if self.mode == "batch":
            with keyed_random(self.seed, step):
                lam = torch.tensor(float(self.mixup._mix_batch(x)))
            lam = lam.expand(count)
        else:
            lam = self._mix_each(x, layout, step)
        targets = _mixup_target(
            labels[layout.to(labels.device)],
            self.mixup.num_classes,
            lam.to(device=x.device, dtype=x.dtype)[:, None],
            self.mixup.label_smoothing,
        )
        back = torch.argsort(layout).to(images.device)
        return x[back], targets[back]

    def _mix_each(self, x: torch.Tensor, layout: torch.Tensor, step: int) -> torch.Tensor:
        """`pair`: one draw per neighbour pair (timm's batch mixing on the two); `elem`: one per
        image, mixing it with its neighbour. Mixes `x` in place; returns each image's lambda."""
        count = len(x)
        lam = torch.ones(count)
        original = x.clone()
        for a in range(count // 2):
            b = count - 1 - a  # a's neighbour in the global batch
            position = self.first_position + int(layout[a])
            if self.mode == "pair":
                two = original[[a, b]]
                with keyed_random(self.seed, step, position // 2):
                    lam[a] = lam[b] = float(self.mixup._mix_batch(two))
                x[a], x[b] = two[0], two[1]
                continue
            for me, other, where in ((a, b, position), (b, a, position + 1)):
                two = original[[me, other]]
                with keyed_random(self.seed, step, where):
                    lam[me] = float(self.mixup._mix_batch(two))
                x[me] = two[0]
        return lam


def _mixup_target(
    labels: torch.Tensor, num_classes: int, lam: torch.Tensor, smoothing: float
) -> torch.Tensor:
    from timm.data.mixup import mixup_target

    return mixup_target(labels, num_classes, lam, smoothing)
