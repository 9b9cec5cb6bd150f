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
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from sparsekit.recipe.span import Span

if TYPE_CHECKING:  # recipe/ imports nothing of sparsekit at run time but errors (architecture.md)
    from sparsekit.timeline import Timeline

# Measured: benchmarks/update_cadence.py, docs/results.md#update-cadence.
MIN_STEPS_BETWEEN_UPDATES = 90
DEFAULT_UPDATE_EVERY = Span(1, "epochs")
# How the share of units or weights replaced at each prune/grow update decays; formulas in
# sparsekit.modifiers.schedules.update_fraction and docs/recipes.md.
FractionDecay = Literal["cosine", "linear", "constant", "reference"]


# The cadence fields of every prune-and-grow phase. Each phase declares them itself, in its
# own field order (the order of a dumped recipe.yaml and of "allowed keys" messages), from
# these one definitions.
def update_every_field() -> Any:
    return Field(
        None,
        description="Time between prune/grow updates; default 1 epoch (unless `updates` is given).",
    )


def updates_field() -> Any:
    return Field(
        None,
        ge=1,
        le=1_000_000,
        description="Instead of update_every: this many updates, evenly spaced strictly inside "
        "the window (every ceil(window / (updates + 1)) steps), whatever the run's length.",
    )


def min_update_interval_field() -> Any:
    return Field(
        Span(MIN_STEPS_BETWEEN_UPDATES, "steps"),
        description="Fewest optimizer steps between updates: a shorter interval (a shortened "
        "run) is raised to it, with a note. The default was chosen by measurement.",
    )


def update_fraction_field(what: str) -> Any:
    return Field(
        0.5, gt=0, le=1, description=f"Share of active {what} replaced at the first update."
    )


def fraction_decay_field() -> Any:
    return Field(
        "cosine",
        description="cosine, linear, constant: from update_fraction to 0 over [start, end]; "
        "reference: the SViTE code's cosine over the whole run to 0.005.",
    )


def describe_updates(config: Any, timeline: Timeline) -> str:
    """For `recipe show`: when the updates run and how much each replaces."""
    cadence = update_cadence(config, timeline)
    decay = config.fraction_decay
    if decay == "reference":
        decay = "reference (cosine over the run to 0.005)"
    return (
        f"every {cadence.every:,} steps ({cadence.count()} updates), "
        f"fraction {config.update_fraction:g} {decay}"
    )


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
        if phase.scheduled_updates:
            label = f"phases[{i}] ({phase.name or phase.kind})"
            note = cadence_note(label, phase, timeline)
            if note:
                notes.append(note)
    return notes
