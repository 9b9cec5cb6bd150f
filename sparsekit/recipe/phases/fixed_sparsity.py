"""kind: fixed_sparsity (fine-tune a sparse model with its sparsity held), on the recipe side."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from sparsekit.recipe.phases.base import PhaseConfig
from sparsekit.recipe.span import Span
from sparsekit.recipe.targets import ROLES, Targets

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class FixedSparsityPhase(PhaseConfig):
    """Hold the sparsity the model starts with while it trains: fine-tune a sparse export
    (`sparsekit apply --init-from EXPORT`) on new data and export it with exactly its heads,
    neurons, zeros and token selectors.

    From `start` until the run ends, the target weights that are zero stay exactly zero (their
    gradients and optimizer state masked), the heads and MLP neurons that are off stay off
    (gated; with `training.compute: active` the steps run on the kept ones only), and the
    export's token selectors keep choosing tokens, their scorers frozen. Started from an export
    the masks are the export's; otherwise they are read from the model at `start`: a weight
    that is exactly 0, a head or neuron whose weights are all 0.
    """

    kind: Literal["fixed_sparsity"]
    start: Span = Field(
        Span(0, "epochs"), description="When the masks are taken and from when they are held."
    )
    targets: Targets = Field(
        Targets(roles=list(ROLES)),
        description="The weights whose zeros are held (every role by default).",
    )
    units: bool = Field(
        True, description="Hold the heads and MLP neurons that are off (false: leave them)."
    )
    tokens: bool = Field(
        True,
        description="Hold the export's token selection, scorers frozen (false: leave it to a "
        "token_select phase, which trains them).",
    )

    modifier: ClassVar[str] = "sparsekit.modifiers.fixed_sparsity"
    example: ClassVar[dict] = {"kind": "fixed_sparsity"}
    lasts_to_end: ClassVar[bool] = True
    masks_weights: ClassVar[bool] = True
    at_most_once: ClassVar[str | None] = (
        "one holds the whole starting sparsity. Keep one (narrow what it holds with targets, "
        "units and tokens)"
    )
    not_compilable: ClassVar[str | None] = (
        "it gates heads and neurons with head_prune_grow's per-sample gates, whose gradient "
        "hooks are made inside the forward pass, which torch.compile does not run"
    )

    @property
    def end(self) -> Span:
        """The masks last until the run ends."""
        return Span(1.0, "fraction")

    def describe(self, timeline: Timeline) -> str:
        held = [f"zeros ({self.targets.describe()})"]
        if self.units:
            held.append("heads and neurons")
        if self.tokens:
            held.append("token selectors (frozen)")
        return "held as they start: " + ", ".join(held)
