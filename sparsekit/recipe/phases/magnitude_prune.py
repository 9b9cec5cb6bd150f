"""kind: magnitude_prune (the one-shot baseline), on the recipe side."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from sparsekit.recipe.phases.base import PhaseConfig
from sparsekit.recipe.span import Span
from sparsekit.recipe.targets import Targets

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class MagnitudePrunePhase(PhaseConfig):
    """One-shot magnitude pruning, the baseline dynamic sparse training is measured against.

    At `start` (usually after a dense warm-up) each layer keeps its budget of largest |w|; the
    mask then stays fixed until the run ends, so the rest of the run fine-tunes the pruned
    network. There is no `end`: nothing changes after the one pruning step.
    """

    kind: Literal["magnitude_prune"]
    start: Span = Field(Span(0, "epochs"), description="When the weights are pruned.")
    sparsity: float = Field(gt=0, lt=1, description="Share of target weights that are zero.")
    distribution: Literal["erk", "uniform"] = "erk"
    targets: Targets = Targets()

    modifier: ClassVar[str] = "sparsekit.modifiers.magnitude_prune"
    example: ClassVar[dict] = {"kind": "magnitude_prune", "sparsity": 0.5}
    lasts_to_end: ClassVar[bool] = True
    masks_weights: ClassVar[bool] = True

    @property
    def end(self) -> Span:
        """The mask lasts until the run ends."""
        return Span(1.0, "fraction")

    def describe(self, timeline: Timeline) -> str:
        return (
            f"sparsity {self.sparsity:g} ({self.distribution}), pruned once by magnitude, "
            f"{self.targets.describe()}"
        )
