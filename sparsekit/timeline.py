"""The run's length in optimizer steps, used to turn recipe spans into exact step numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsekit.errors import SparsekitError
from sparsekit.recipe.span import Span


@dataclass(frozen=True)
class Timeline:
    """`epochs` epochs of `steps_per_epoch` optimizer steps each."""

    epochs: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise SparsekitError(
                f"a run needs at least one epoch of at least one step, got {self.epochs} epochs "
                f"of {self.steps_per_epoch} steps (is the data loader empty?)"
            )

    @classmethod
    def for_dataset(cls, epochs: int, dataset_size: int, batch_size: int) -> Timeline:
        """Steps per epoch of a loader that keeps the last, smaller batch."""
        return cls(epochs, max(1, math.ceil(dataset_size / batch_size)))

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def steps(self, span: Span) -> int:
        """A span as a step number, clamped to the run."""
        return min(span.to_steps(self.steps_per_epoch, self.total_steps), self.total_steps)
