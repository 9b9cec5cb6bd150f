"""The modifier lifecycle: the base class owns the order of events, subclasses write small hooks.

A modifier is built from one validated phase config (pure data) plus its window in optimizer
steps; runtime state (masks, accumulators) lives in the modifier and round-trips through
`state_dict` so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel
from torch import nn

from sparsekit.surgery.edits import ModelEdits

if TYPE_CHECKING:
    from rich.console import RenderableType

    from sparsekit.modifiers.start_state import StartState
    from sparsekit.session import Session
    from sparsekit.timeline import Timeline


class Modifier:
    """One recipe phase at run time, active on steps `[start_step, end_step)`."""

    kind: ClassVar[str]  # set by @register, from the config class
    config_type: ClassVar[type[BaseModel]]
    # How training steps compute (`training.compute`), set by the compiler: "active" runs only
    # the kept heads, neurons and tokens where a modifier supports it, "masked" runs full size.
    compute: str = "masked"

    def __init__(self, config: BaseModel, model: nn.Module, start_step: int, end_step: int):
        self.config = config
        self.model = model
        self.start_step = start_step
        self.end_step = end_step
        # Every hook, forward and module this modifier puts into the model, undone by `close`.
        self.edits = ModelEdits()

    @classmethod
    def build(cls, config: Any, model: nn.Module, timeline: Timeline, seed: int) -> Modifier:
        """Make the modifier for one phase; kinds that need more than a window override this."""
        return cls(config, model, timeline.steps(config.start), timeline.steps(config.end))

    @classmethod
    def describe_on(
        cls, config: Any, index: int, model: nn.Module, label: str
    ) -> RenderableType | None:
        """What phase `index` keeps in each block of `model` (named `label`), for
        `recipe show --model`; kinds whose config has `per_block` override this."""
        return None

    def check_compute(self) -> None:
        """Refuse `compute: active` (set by the compiler) when a head or neuron this phase
        gates belongs to a class without an active forward (`surgery.active.check_active`)."""
        owned = self.units_owned()
        if self.compute == "active" and owned:
            from sparsekit.surgery.active import check_active
            from sparsekit.surgery.compact import unit_groups

            groups = unit_groups(self.model, owned)
            check_active([groups[name] for name in owned])

    @property
    def label(self) -> str:
        return getattr(self.config, "name", None) or self.kind

    def active(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) lies inside this modifier's window."""
        return self.start_step <= step < self.end_step

    # Event hooks; `session.step` is the 0-based index of the optimizer step being taken.
    def on_batch_start(self, session: Session) -> None:
        """Before the forward pass of a training batch."""

    def before_optimizer_step(self, session: Session) -> None:
        """Gradients are ready (and unscaled under AMP); the optimizer has not stepped yet."""

    def after_optimizer_step(self, session: Session) -> None:
        """The optimizer has stepped; restore invariants (masked weights, frozen units).
        `session.step` still names the step just taken."""

    def on_update(self, session: Session) -> None:
        """After every modifier's `after_optimizer_step`: the moment for prune/grow decisions,
        so no modifier's update is undone by another's restoring its invariants."""

    def on_skipped_step(self, session: Session) -> None:
        """Instead of the three events above, on a step that took no optimizer step."""

    def on_epoch_end(self, session: Session) -> None:
        """After the last batch of an epoch."""

    def finalize(self, session: Session) -> None:
        """Training is over; leave the model in its final state."""

    def close(self) -> None:
        """Take every change this modifier made to the model out again (`Session.close`);
        kinds that gate units zero the dropped ones first, so the plain model computes what the
        gated one did."""
        self.edits.undo()

    def first_masks(self) -> None:
        """Make the phase's first masks now, as at its first batch but without an optimizer
        (what `sparsekit inspect --recipe` shows); kinds without masks do nothing."""

    def start_from(self, start: StartState) -> None:
        """Take a sparsekit export's state as this phase's first state (`--init-from`), in
        place of the first masks it would choose; called once the recipe is compiled, before
        the export's weights are loaded and the optimizer is built. Kinds that hold sparsity
        override this and raise SparsekitError (what differs, how to fix it) when the export
        does not fit them; kinds without masks take nothing."""

    def masks_owned(self) -> list[str]:
        """Names of the parameters whose sparsity this modifier controls."""
        return []

    def masks(self) -> dict[str, Any]:
        """Boolean keep-masks of the weights this modifier makes sparse, by parameter name."""
        return {}

    def units_owned(self) -> list[str]:
        """Names of the attention and MLP blocks whose heads or neurons this modifier gates."""
        return []

    def unit_masks(self) -> dict[str, Any]:
        """Boolean keep-masks of heads ("blocks.3.attn") and neurons ("blocks.3.mlp")."""
        return {}

    def token_placements(self) -> list[Any]:
        """Token selectors this modifier placed in the model (`surgery.tokens.Placement`)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
