"""When a prune-and-grow phase updates its masks, in optimizer steps, and why a shortened run
must not update more often than a floor.

A recipe written for 600 ImageNet epochs puts thousands of steps between updates; shortened
with `--epochs`, a cadence written as a share of the run (`update_every: "1%"`) or a count
(`updates: 80`) would bring them a few steps apart, each replacing up to half of the weights
before the model has recovered from the last. `min_update_interval` is that floor: the resolved
interval is never shorter, and a note says when the floor changed the cadence. The default was
chosen by measurement (benchmarks/update_cadence.py; docs/results.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparsekit.recipe.span import Span

if TYPE_CHECKING:  # recipe/ imports nothing of sparsekit at run time but errors (architecture.md)
    from sparsekit.timeline import Timeline

# Measured: benchmarks/update_cadence.py, docs/results.md#update-cadence.
MIN_STEPS_BETWEEN_UPDATES = 90
DEFAULT_UPDATE_EVERY = Span(1, "epochs")


@dataclass(frozen=True)
class Cadence:
    """A phase's updates resolved on a timeline."""

    asked: int  # steps between updates as the recipe asks (update_every, or from updates)
    floor: int  # min_update_interval in steps
    every: int  # what runs: max(asked, floor)
    start: int
    end: int

    def count(self, every: int | None = None) -> int:
        """Updates in the window at `every` steps apart (default: the resolved interval)."""
        every = every or self.every
        return len(range(self.start + every, self.end, every))


def update_cadence(config: Any, timeline: Timeline) -> Cadence:
    """The update interval of a prune-and-grow phase (`update_every` or `updates`, and
    `min_update_interval`) in steps on `timeline`."""
    start, end = timeline.steps(config.start), timeline.steps(config.end)
    if config.updates is not None:
        # `updates` updates strictly inside the window: start + k * every < end, k = 1..updates.
        asked = math.ceil((end - start) / (config.updates + 1))
    else:
        asked = timeline.steps(config.update_every or DEFAULT_UPDATE_EVERY)
    asked = max(1, asked)
    floor = max(1, timeline.steps(config.min_update_interval))
    return Cadence(asked, floor, max(asked, floor), start, end)


def cadence_note(label: str, config: Any, timeline: Timeline) -> str | None:
    """One line when the cadence needs the user's attention, naming the fix; else None.

    - The floor changed the cadence: say so, and how to keep the updates closer.
    - The recipe lowered the floor below the measured one and updates come closer than it.
    """
    cadence = update_cadence(config, timeline)
    asked = (
        f"updates: {config.updates}" if config.updates is not None else
        f"update_every: {config.update_every or DEFAULT_UPDATE_EVERY}"
    )  # fmt: skip
    if cadence.every > cadence.asked:
        return (
            f"{label}: {asked} gives an update every {cadence.asked:,} steps on this run, closer "
            f"than min_update_interval ({cadence.floor:,} steps), so updates run every "
            f"{cadence.every:,} steps ({cadence.count()} updates instead of "
            f"{cadence.count(cadence.asked)}); to update more often, lower min_update_interval."
        )
    if cadence.every < MIN_STEPS_BETWEEN_UPDATES and cadence.count() > 1:
        return (
            f"{label}: updates every {cadence.every:,} steps come closer than the "
            f"{MIN_STEPS_BETWEEN_UPDATES} steps below which accuracy was measured to suffer "
            "(docs/results.md); space them out with a larger update_every (or fewer updates), "
            f"or leave min_update_interval at its default of {MIN_STEPS_BETWEEN_UPDATES} steps."
        )
    return None


def cadence_notes(recipe: Any, timeline: Timeline) -> list[str]:
    """The notes of every prune-and-grow phase of a recipe."""
    notes = []
    for i, phase in enumerate(recipe.phases):
        if hasattr(phase, "min_update_interval"):
            label = f"phases[{i}] ({phase.name or phase.kind})"
            note = cadence_note(label, phase, timeline)
            if note:
                notes.append(note)
    return notes
