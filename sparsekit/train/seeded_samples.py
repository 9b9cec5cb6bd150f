"""A training set whose images are augmented under their own key (`train/keyed_random.py`).

DataLoader workers seed themselves once, from a number the main process draws, and then draw
in the order the images reach them: the augmentation would depend on the number of workers,
on whether they persist across epochs, on the number of processes, and a resumed run could not
draw what the uninterrupted one drew. Keyed by (seed, epoch, position), it depends on none.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from sparsekit.train.epoch_order import SampleKey
from sparsekit.train.keyed_random import keyed_random


class SeededSamples(Dataset):
    """`dataset[index]`, drawn under the key (seed, epoch, position) that `EpochOrder` gives."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        index, epoch, position = key
        with keyed_random(self.seed, epoch, position):
            return self.dataset[index]
