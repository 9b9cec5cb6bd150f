"""What every prune-and-grow phase shares: masks that appear at `start`, updates every
`update_every` until `end` with a decaying share replaced, and masks that stay after it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.schedules import is_update_step, next_update, update_fraction
from sparsekit.recipe.cadence import update_cadence

if TYPE_CHECKING:
    from sparsekit.session import Session
    from sparsekit.surgery.optimizer_state import OptimizerRestarts
    from sparsekit.timeline import Timeline


class PruneGrowModifier(Modifier):
    """Subclasses find what they act on (`find`), make the first masks (`initialize`) and
    update them (`prune_and_grow`); this class decides when."""

    def __init__(
        self,
        config: Any,
        model: nn.Module,
        start_step: int,
        end_step: int,
        parts: list[Any],
        update_every: int,
        seed: int,
        total_steps: int | None = None,
    ):
        super().__init__(config, model, start_step, end_step)
        # The run's length: the reference's fraction decay runs over the whole run.
        self.total_steps = end_step if total_steps is None else total_steps
        self.update_every = max(1, update_every)
        self.seed = seed
        self.initialized = False
        self.updates_done = 0
        # An update that fell on a skipped step (non-finite loss) waits for the next step that
        # trains: the completed-step count it was due at, else None.
        self.deferred: int | None = None

    @classmethod
    def build(cls, config: Any, model: nn.Module, timeline: Timeline, seed: int) -> Modifier:
        return cls(
            config,
            model,
            timeline.steps(config.start),
            timeline.steps(config.end),
            cls.find(config, model),
            update_every=update_cadence(config, timeline).every,
            seed=seed,
            total_steps=timeline.total_steps,
        )

    @classmethod
    def find(cls, config: Any, model: nn.Module) -> list[Any]:
        """What the phase acts on (weights, or unit groups), checked against the model."""
        raise NotImplementedError

    def initialize(self, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        """Make the first masks (zeroing the optimizer state of what they drop, through
        `restarts`, when there is an optimizer); return extra fields for the `mask_init` event."""
        raise NotImplementedError

    def prune_and_grow(self, fraction: float, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        """Replace `fraction` of the active units (zeroing the optimizer state of the pruned
        ones and restarting that of the grown ones); return fields for the `mask_update`
        event."""
        raise NotImplementedError

    # --- when growth is scored ------------------------------------------------------------
    def in_grow_window(self, step: int, batches: int) -> bool:
        """Whether step `step` (0-based) is among the last `batches` steps before an update,
        a deferred one included: the steps whose gradients score growth."""
        if self.deferred is not None:
            return True
        upcoming = next_update(step + 1, self.start_step, self.end_step, self.update_every)
        return upcoming is not None and upcoming - (step + 1) < batches

    def updates_ahead(self, step: int) -> bool:
        """Whether an update may still come after step `step` (0-based), a deferred one
        included: until none can, steps are scored."""
        return step + 1 < self.end_step or self.deferred is not None

    # --- lifecycle -------------------------------------------------------------------------
    def active(self, step: int) -> bool:
        """Acting on the model from `start_step` on: masks outlive the update window."""
        return step >= self.start_step

    def first_masks(self) -> None:
        if not self.initialized:
            self.initialize(None)
            self.initialized = True

    def on_batch_start(self, session: Session) -> None:
        if not self.initialized and session.step >= self.start_step:
            extra = self.initialize(session.restarts)
            self.initialized = True
            session.record(self, {"event": "mask_init", "step": session.step, **extra})

    def _due(self, count: int) -> bool:
        return self.initialized and is_update_step(
            count, self.start_step, self.end_step, self.update_every
        )

    def on_skipped_step(self, session: Session) -> None:
        count = session.step + 1
        if self._due(count) and self.deferred is None:
            self.deferred = count

    def on_update(self, session: Session) -> None:
        count = session.step + 1
        if not (self._due(count) or (self.initialized and self.deferred is not None)):
            return
        due, self.deferred = self.deferred or count, None
        fraction = update_fraction(
            self.config, due, self.start_step, self.end_step, self.total_steps
        )
        extra = self.prune_and_grow(fraction, session.restarts)
        self.updates_done += 1
        event = {"event": "mask_update", "step": count, "fraction": fraction, **extra}
        if due != count:
            event["deferred_from"] = due  # due on a skipped step, taken on this one
        session.record(self, event)
