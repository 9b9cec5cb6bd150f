"""What every prune-and-grow phase shares: masks that appear at `start`, updates every
`update_every` until `end` with a decaying share replaced, and masks that stay after it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.schedules import decayed_fraction, is_update_step

if TYPE_CHECKING:
    from sparsekit.session import Session
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
    ):
        super().__init__(config, model, start_step, end_step)
        self.update_every = max(1, update_every)
        self.seed = seed
        self.initialized = False
        self.updates_done = 0

    @classmethod
    def build(cls, config: Any, model: nn.Module, timeline: Timeline, seed: int) -> Modifier:
        return cls(
            config,
            model,
            timeline.steps(config.start),
            timeline.steps(config.end),
            cls.find(config, model),
            update_every=timeline.steps(config.update_every),
            seed=seed,
        )

    @classmethod
    def find(cls, config: Any, model: nn.Module) -> list[Any]:
        """What the phase acts on (weights, or unit groups), checked against the model."""
        raise NotImplementedError

    def initialize(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Make the first masks; return extra fields for the `mask_init` event."""
        raise NotImplementedError

    def prune_and_grow(
        self, fraction: float, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Replace `fraction` of the active units; return fields for the `mask_update` event."""
        raise NotImplementedError

    # --- lifecycle -------------------------------------------------------------------------
    def active(self, step: int) -> bool:
        """Acting on the model from `start_step` on: masks outlive the update window."""
        return step >= self.start_step

    def on_batch_start(self, session: Session) -> None:
        if not self.initialized and session.step >= self.start_step:
            extra = self.initialize(session.optimizer)
            self.initialized = True
            session.record(self, {"event": "mask_init", "step": session.step, **extra})

    def on_update(self, session: Session) -> None:
        count = session.step + 1
        if not self.initialized or not is_update_step(
            count, self.start_step, self.end_step, self.update_every
        ):
            return
        progress = (count - self.start_step) / max(1, self.end_step - self.start_step)
        fraction = decayed_fraction(
            self.config.update_fraction, progress, self.config.fraction_decay
        )
        extra = self.prune_and_grow(fraction, session.optimizer)
        self.updates_done += 1
        session.record(self, {"event": "mask_update", "step": count, "fraction": fraction, **extra})
