"""One-shot magnitude pruning, then fine-tuning with the mask fixed: the baseline a user would
otherwise pick, and the one SViTE's exploration is measured against.

It keeps unstructured DST's masks without its updates: the same layer budgets (ERK or uniform,
exact counts), the same masking of gradients and optimizer state (`surgery.weight_masks`), and
a first mask that keeps each layer's largest |w| at `start`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import register
from sparsekit.modifiers.start_state import start_scores
from sparsekit.recipe.schema import MagnitudePrunePhase
from sparsekit.surgery.targets import Target, find_targets
from sparsekit.surgery.weight_masks import WeightMasks

if TYPE_CHECKING:
    from sparsekit.modifiers.start_state import StartState
    from sparsekit.session import Session
    from sparsekit.surgery.optimizer_state import OptimizerRestarts
    from sparsekit.timeline import Timeline


@register(MagnitudePrunePhase)
class MagnitudePrune(Modifier):
    """Prunes once at `start_step`; the mask stays until the run ends."""

    config: MagnitudePrunePhase

    def __init__(
        self,
        config: MagnitudePrunePhase,
        model: nn.Module,
        start_step: int,
        end_step: int,
        targets: list[Target],
    ):
        super().__init__(config, model, start_step, end_step)
        self.targets = targets
        self.weight_masks = WeightMasks(targets, config.sparsity, config.distribution)
        self.budgets = self.weight_masks.budgets
        self.initialized = False
        # Started from an export (--init-from), until its mask is made from it.
        self._start: StartState | None = None
        self.seed = 0

    @classmethod
    def build(cls, config: Any, model: nn.Module, timeline: Timeline, seed: int) -> Modifier:
        targets = find_targets(
            model, list(config.targets.roles), config.targets.include, config.targets.exclude
        )
        modifier = cls(config, model, timeline.steps(config.start), timeline.total_steps, targets)
        modifier.seed = seed
        return modifier

    # --- lifecycle -------------------------------------------------------------------------
    def active(self, step: int) -> bool:
        """Acting on the model from `start_step` on: the mask lasts until the run ends."""
        return step >= self.start_step

    def on_batch_start(self, session: Session) -> None:
        if not self.initialized and session.step >= self.start_step:
            self.initialize(session.restarts)
            session.record(self, {"event": "mask_init", "step": session.step})

    def first_masks(self) -> None:
        if not self.initialized:
            self.initialize(None)

    def start_from(self, start: StartState) -> None:
        """The mask is the export's, each layer's budget made up as `start_scores` says;
        layers the export lacks (a fresh classifier) are pruned by magnitude."""
        self._start_scores(start)  # refused here, before anything trains, if it does not fit
        self._start = start

    def _start_scores(self, start: StartState | None) -> dict[str, torch.Tensor]:
        if start is None:
            return {}
        asks = f"sparsity {self.config.sparsity:g} ({self.config.distribution})"
        return start_scores(self.targets, self.budgets, start, self.seed, asks)

    def initialize(self, restarts: OptimizerRestarts | None) -> None:
        """Keep each layer's largest |w| (or the export's mask), zeroing the optimizer state of
        the rest."""
        scores, self._start = self._start_scores(self._start), None
        given = {id(t.weight): scores.get(t.name) for t in self.targets}
        self.weight_masks.set_first(
            lambda w: w.detach().abs() if given[id(w)] is None else given[id(w)], restarts
        )
        self.initialized = True

    def before_optimizer_step(self, session: Session) -> None:
        if self.initialized:
            self.weight_masks.mask_gradients()

    def after_optimizer_step(self, session: Session) -> None:
        if self.initialized:
            self.weight_masks.restore_after_step(session.optimizer)

    # --- reporting and resume --------------------------------------------------------------
    def masks_owned(self) -> list[str]:
        return self.weight_masks.owned()

    def masks(self) -> dict[str, torch.Tensor]:
        return self.weight_masks.by_parameter()

    def state_dict(self) -> dict[str, Any]:
        # The keys of the prune-and-grow state this phase's checkpoints have always held, with
        # the values of a phase that never updates: checkpoints load across versions.
        return {
            "initialized": self.initialized,
            "updates_done": 0,
            "deferred": None,
            "masks": self.weight_masks.state_dict(),
            "grad_sum": {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the masks; the other saved keys are those of a phase that never updates."""
        self.weight_masks.load_state_dict(state["masks"])
        self.initialized = bool(state["initialized"])
        if self.initialized:
            self._start = None  # the masks are the checkpoint's
