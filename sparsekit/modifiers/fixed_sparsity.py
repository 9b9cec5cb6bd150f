"""Fixed sparsity: fine-tune a sparse model with its sparsity held, from `start` to the end.

Three things are held, each by the same mechanics as the phase that made it:
- zero weights of the targets, by `WeightMasks` (gradients masked before each step, weights
  re-masked after it where the optimizer may move them), as unstructured DST holds its masks;
- heads and MLP neurons that are off, by head_prune_grow's gates (a gated unit contributes
  exactly nothing), and with `training.compute: active` by `ActiveForward`, so every training
  step runs on the kept units only (no step ever needs the full size: nothing is grown);
- the export's token selectors, put back in front of their blocks with their scorers frozen
  (no gradient, no Gumbel noise): training selects the tokens the export selects.
Nothing is chosen: the masks are the export's (`start_from`), or the model's own zeros at
`start` when the run does not start from an export.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import register
from sparsekit.recipe.phases.fixed_sparsity import FixedSparsityPhase
from sparsekit.surgery.active import ActiveForward
from sparsekit.surgery.compact import zero_units_
from sparsekit.surgery.expand import zeroed_units
from sparsekit.surgery.layouts import gateable_groups
from sparsekit.surgery.optimizer_state import zero_and_restart
from sparsekit.surgery.targets import Target, find_targets
from sparsekit.surgery.tokens import Placement, TokenScorer, TokenSelection, selection_of
from sparsekit.surgery.unit_slices import unit_positions
from sparsekit.surgery.units import UnitGate, UnitGroup, kept_counts
from sparsekit.surgery.weight_masks import WeightMasks

if TYPE_CHECKING:
    from sparsekit.modifiers.start_state import StartState
    from sparsekit.session import Session
    from sparsekit.surgery.optimizer_state import OptimizerRestarts
    from sparsekit.timeline import Timeline


@register(FixedSparsityPhase)
class FixedSparsity(Modifier):
    """Masks taken at `start_step` and held until the run ends; they never change."""

    config: FixedSparsityPhase

    def __init__(
        self,
        config: FixedSparsityPhase,
        model: nn.Module,
        start_step: int,
        end_step: int,
        targets: list[Target],
        groups: list[UnitGroup],
    ):
        super().__init__(config, model, start_step, end_step)
        self.targets = targets
        # Budgets are not used: the masks are read, never chosen.
        self.weight_masks = WeightMasks(targets, 0.0, "uniform")
        self.groups = groups  # every head and neuron group (with `units`)
        self.keeps: dict[str, torch.Tensor] = {}
        self.placements: list[Placement] = []
        self.selection: TokenSelection | None = None
        self.initialized = False
        self._start: StartState | None = None
        self._gates: dict[str, UnitGate] = {}

    @classmethod
    def build(cls, config: Any, model: nn.Module, timeline: Timeline, seed: int) -> Modifier:
        targets = find_targets(
            model, list(config.targets.roles), config.targets.include, config.targets.exclude
        )
        # Units of a layout sparsekit cannot gate are left whole (an export that drops some
        # there is refused: no phase holds them).
        groups = gateable_groups(model) if config.units else []
        return cls(
            config, model, timeline.steps(config.start), timeline.total_steps, targets, groups
        )

    # --- the starting state ----------------------------------------------------------------
    def start_from(self, start: StartState) -> None:
        """Hold the export's zeros, units and token selectors (as far as `targets`, `units`
        and `tokens` reach); the selectors join the model now, so the export's scorer weights
        load into them."""
        self._start = start
        if self.config.tokens and start.placements:
            if selection_of(self.model) is not None:
                raise SparsekitError(
                    "a token_select phase of this recipe already selects tokens with the "
                    "export's scorers; set tokens: false on this phase to let that phase train "
                    "them, or remove it to hold them fixed here."
                )
            self._select(list(start.placements))

    def _select(self, placements: list[Placement]) -> None:
        """Put the selectors in front of their blocks, frozen: no gradient reaches the scorers
        or, through their scores, the tokens (the straight-through path is cut), and no noise
        is drawn, so training selects as the export's evaluation does."""
        self.placements = placements
        self.selection = TokenSelection(self.model, placements, self.edits)
        self.selection.noise = False
        self.selection.enabled = False
        for scorer in self.model.token_selectors.values():
            scorer.requires_grad_(False)
            self.edits.override_forward(scorer, types.MethodType(_detached_forward, scorer))

    # --- lifecycle -------------------------------------------------------------------------
    def active(self, step: int) -> bool:
        """Acting on the model from `start_step` on: the masks last until the run ends."""
        return step >= self.start_step

    def on_batch_start(self, session: Session) -> None:
        if not self.initialized and session.step >= self.start_step:
            extra = self.initialize(session.restarts)
            session.record(self, {"event": "mask_init", "step": session.step, **extra})
        if self.selection is not None:
            self.selection.enabled = self.active(session.step)
            self.selection.gather_in_training = self.compute == "active"

    def first_masks(self) -> None:
        if not self.initialized:
            self.initialize(None)

    @torch.no_grad()
    def initialize(self, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        """Take the masks (the export's, else the model's zeros now), zero what they drop and
        its optimizer state, and gate the units that are off."""
        start = self._start
        for t in self.targets:
            given = start.nonzero(f"{t.name}.weight") if start is not None else None
            mask = given if given is not None else t.weight.ne(0)
            self.weight_masks.set(t.name, mask.to(t.weight.device))
        zero_and_restart(
            restarts, pruned=((t.weight, ~self.weight_masks.masks[t.name]) for t in self.targets)
        )
        self.weight_masks.apply()
        if start is not None:
            whole = {g.name: torch.ones(g.units, dtype=torch.bool) for g in self.groups}
            self.keeps = {n: start.unit_keeps.get(n, k).clone() for n, k in whole.items()}
        else:
            self.keeps = zeroed_units(self.groups)
        dropped = {n: ~k for n, k in self.keeps.items()}
        zero_units_({g.name: g for g in self.groups}, self.keeps)
        zero_and_restart(restarts, pruned=unit_positions(self.groups, dropped))
        self._install()
        self.initialized = True
        self._start = None  # taken: the export's tensors are not kept for the run
        return self._counts()

    def _install(self) -> None:
        """Gate the groups that drop a unit (the others run as they are), and run the kept
        units only in training steps under `compute: active`."""
        gated = [g for g in self.groups if not self.keeps[g.name].all()]
        for g in gated:
            self._gates[g.name] = UnitGate(g, self.keeps[g.name], self.edits)
        if gated:
            active = ActiveForward(gated, self._gates, self.edits)
            active.set(self.keeps)
            if self.compute == "active":
                active.enable()

    def _counts(self) -> dict[str, Any]:
        """Event fields: units kept by kind, the heads each block keeps, the share of zeros."""
        counts = kept_counts(self.groups, self.keeps)
        masks = self.weight_masks.masks.values()
        counts["zeros"] = sum(int((~m).sum()) for m in masks)
        return counts

    def before_optimizer_step(self, session: Session) -> None:
        if self.initialized:
            self.weight_masks.mask_gradients()
            for gate in self._gates.values():
                gate.take()  # nothing is scored: the gates' sums are dropped

    def after_optimizer_step(self, session: Session) -> None:
        if self.initialized:
            self.weight_masks.restore_after_step(session.optimizer)

    def finalize(self, session: Session) -> None:
        if self.selection is not None:
            self.selection.enabled = True  # the trained model selects, as its export will

    def close(self) -> None:
        """Take the gates, forwards and token selectors out, the dropped units' weights zero:
        the plain model computes what the gated one did."""
        super().close()
        if self.initialized:
            zero_units_({g.name: g for g in self.groups}, self.keeps)

    # --- reporting and resume --------------------------------------------------------------
    def masks_owned(self) -> list[str]:
        return self.weight_masks.owned()

    def masks(self) -> dict[str, torch.Tensor]:
        return self.weight_masks.by_parameter() if self.initialized else {}

    def units_owned(self) -> list[str]:
        return [g.name for g in self.groups]

    def unit_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.keeps) if self.initialized else {}

    def token_placements(self) -> list[Placement]:
        return list(self.placements)

    def state_dict(self) -> dict[str, Any]:
        return {
            "initialized": self.initialized,
            "masks": self.weight_masks.state_dict(),
            "keeps": dict(self.keeps),
            "placements": [[p.before_block, p.keep_ratio] for p in self.placements],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the masks back; the token selectors too, when this phase has not placed them
        yet (a run folder read back without its export: `sparsekit export`)."""
        placements = [Placement(int(b), float(r)) for b, r in state["placements"]]
        if self.selection is None and placements:
            self._select(placements)
        elif placements != self.placements:
            raise ValueError(
                f"checkpoint token selectors {state['placements']}, this phase has "
                f"{[[p.before_block, p.keep_ratio] for p in self.placements]}"
            )
        names = {g.name for g in self.groups}
        if set(state["keeps"]) != (names if state["initialized"] else set()):
            raise ValueError(
                f"checkpoint unit masks name blocks {sorted(state['keeps'])[:3]}..., this phase "
                f"holds {sorted(names)[:3]}..."
            )
        self.weight_masks.load_state_dict(state["masks"])
        self.keeps = {n: k.to(torch.bool).cpu() for n, k in state["keeps"].items()}
        self.initialized = bool(state["initialized"])
        if self.initialized:
            self._start = None  # the masks are the checkpoint's
            if not self._gates:
                self._install()


def _detached_forward(scorer: TokenScorer, x: torch.Tensor) -> torch.Tensor:
    """A frozen scorer's forward: scores of tokens that no gradient flows back through."""
    return type(scorer).forward(scorer, x.detach())
