"""The order of an epoch: which images each process trains on, batch after batch.

One seeded permutation per epoch, drawn from (seed, epoch) alone and cut into global batches;
each of the `world` processes takes the r-th equal, contiguous share of every global batch, so
the processes together train on exactly the batches one process would (and `GlobalBatchNoise`
finds its rows by that rule). Each image comes with its key (epoch, position in the epoch),
under which `SeededSamples` draws its augmentation.

Repeated augmentation (DeiT's `RASampler`): each image of the permutation appears `repeats`
times in a row, the stream is cut back to the data set's length (an epoch keeps its length),
and each global batch is shuffled so that the copies of an image, still in one global batch,
are spread across it (mixup's pairs are neighbours, `train/mixing.py`). DeiT's sampler deals
the stream out to the processes in turn, which makes the batches depend on the number of
processes; this one does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from sparsekit.train.distributed import Ranks, share_of

SampleKey = tuple[int, int, int]  # (index in the data set, epoch, position in the epoch)


class EpochOrder(Sampler[list[SampleKey]]):
    """This process's batches of keyed samples for the epoch last given to `set_epoch`.

    The last, partial global batch is dropped when `drop_last` or when several processes train
    (every process must hold the same number of images); a single process keeps it otherwise.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        ranks: Ranks,
        seed: int,
        repeats: int = 1,
        drop_last: bool = False,
    ):
        self.size, self.global_batch, self.ranks = size, global_batch, ranks
        self.seed, self.repeats = seed, repeats
        self.share = share_of(global_batch, ranks)
        self.drop_last = drop_last or ranks.world > 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.global_batch
        return math.ceil(self.size / self.global_batch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.size]
        for step in range(len(self)):
            first = step * self.global_batch
            batch = order[first : first + self.global_batch]
            if self.repeats > 1:
                batch = batch[torch.randperm(len(batch), generator=generator)]
            start = self.ranks.rank * self.share if self.ranks.world > 1 else 0
            mine = batch[start : start + self.share] if self.ranks.world > 1 else batch
            yield [
                (int(index), self.epoch, first + start + offset)
                for offset, index in enumerate(mine.tolist())
            ]
