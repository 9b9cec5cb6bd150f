"""kind: unstructured_dst (SViTE), on the recipe side."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from sparsekit.recipe import cadence
from sparsekit.recipe.cadence import FractionDecay
from sparsekit.recipe.phases.base import WindowedPhase
from sparsekit.recipe.span import Span
from sparsekit.recipe.targets import Targets

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class UnstructuredDSTPhase(WindowedPhase):
    """SViTE: unstructured dynamic sparse training at a fixed parameter budget.

    Masks appear at `start` and stay until the run ends; `end` is when prune-and-grow updates
    stop (the paper stops them at 80% of the run).
    """

    kind: Literal["unstructured_dst"]
    end: Span = Field(Span(0.8, "fraction"), description="When prune-and-grow updates stop.")
    sparsity: float = Field(gt=0, lt=1, description="Share of target weights that are zero.")
    distribution: Literal["erk", "uniform"] = "erk"
    init: Literal["random", "magnitude"] = Field(
        "random",
        description="How the first mask is chosen: random, or largest |w| (after warm-up).",
    )
    prune: Literal["magnitude"] = "magnitude"
    grow: Literal["gradient", "random"] = Field(
        "gradient", description="gradient: RigL (largest |dL/dw|); random: SET."
    )
    grow_accumulation: int = Field(
        1, ge=1, le=10_000, description="Batches whose dense gradients are summed for growth."
    )
    update_every: Span | None = cadence.update_every_field()
    updates: int | None = cadence.updates_field()
    min_update_interval: Span = cadence.min_update_interval_field()
    update_fraction: float = cadence.update_fraction_field("weights")
    fraction_decay: FractionDecay = cadence.fraction_decay_field()
    targets: Targets = Targets()

    modifier: ClassVar[str] = "sparsekit.modifiers.unstructured_dst"
    example: ClassVar[dict] = {"kind": "unstructured_dst", "sparsity": 0.5}
    lasts_to_end: ClassVar[bool] = True
    masks_weights: ClassVar[bool] = True
    scheduled_updates: ClassVar[bool] = True

    def describe(self, timeline: Timeline) -> str:
        return (
            f"sparsity {self.sparsity:g} ({self.distribution}), grow {self.grow}, "
            f"{cadence.describe_updates(self, timeline)}, {self.targets.describe()}"
        )
