"""SViTE: unstructured dynamic sparse training (prune by magnitude, grow by gradient or at random).

Invariants kept at every step, which the reference implementation does not all keep:
- each layer holds exactly its budget of non-zero weights (grown == pruned per layer); under
  an N:M `pattern`, every group of M consecutive input weights holds exactly N (each group
  regrows what it lost);
- masked weights are exactly 0 after every optimizer step, and their gradients are zeroed
  before it, so Adam moments and SGD momentum never accumulate there;
- optimizer state at every inactive position is zeroed at each update, and a regrown weight
  starts from 0 stepping as a fresh optimizer would (`surgery.optimizer_state`: Adam's bias
  correction restarts with it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsekit.modifiers.prune_grow import PruneGrowModifier
from sparsekit.modifiers.registry import register
from sparsekit.modifiers.start_state import start_scores
from sparsekit.recipe.schema import UnstructuredDSTPhase
from sparsekit.surgery.masks import random_scores, topk_mask
from sparsekit.surgery.nm_masks import check_nm_targets, nm_grow_mask
from sparsekit.surgery.optimizer_state import OptimizerRestarts, zero_and_restart
from sparsekit.surgery.targets import Target, find_targets
from sparsekit.surgery.weight_masks import WeightMasks, as_float

if TYPE_CHECKING:
    from sparsekit.modifiers.start_state import StartState
    from sparsekit.session import Session


@register(UnstructuredDSTPhase)
class UnstructuredDST(PruneGrowModifier):
    """Masks appear at `start_step`, change every `update_every` steps until `end_step`, and stay
    fixed until the run ends."""

    config: UnstructuredDSTPhase

    def __init__(
        self,
        config: UnstructuredDSTPhase,
        model: nn.Module,
        start_step: int,
        end_step: int,
        targets: list[Target],
        update_every: int,
        seed: int,
        total_steps: int | None = None,
    ):
        super().__init__(
            config, model, start_step, end_step, targets, update_every, seed, total_steps
        )
        self.targets = targets
        self.weight_masks = WeightMasks(targets, config.sparsity, config.distribution, config.nm)
        self.budgets = self.weight_masks.budgets
        # Per layer, the dense gradients of the grow window: the grow score of the next update.
        self._grad_sum: dict[str, torch.Tensor] = {}
        # Started from an export (--init-from), until its first masks are made from it.
        self._start: StartState | None = None

    @classmethod
    def find(cls, config: UnstructuredDSTPhase, model: nn.Module) -> list[Target]:
        targets = find_targets(
            model, list(config.targets.roles), config.targets.include, config.targets.exclude
        )
        if config.nm:
            check_nm_targets(targets, *config.nm)  # refused when compiled, the layer named
        return targets

    def before_optimizer_step(self, session: Session) -> None:
        if not self.initialized:
            return
        if self.config.grow == "gradient" and self.in_grow_window(
            session.step, self.config.grow_accumulation
        ):
            self._accumulate_gradients()
        self.weight_masks.mask_gradients()

    def _accumulate_gradients(self) -> None:
        """Add this step's dense gradients (taken before masking) to the grow score."""
        for t in self.targets:
            grad = t.weight.grad
            if grad is None:
                continue
            acc = self._grad_sum.get(t.name)
            self._grad_sum[t.name] = grad.detach().clone() if acc is None else acc.add_(grad)

    def after_optimizer_step(self, session: Session) -> None:
        if self.initialized:
            self.weight_masks.restore_after_step(session.optimizer)

    # --- masks -----------------------------------------------------------------------------
    def start_from(self, start: StartState) -> None:
        """The first masks are the export's, each layer's budget made up as `start_scores`
        says; layers the export lacks (a fresh classifier) get the phase's own `init`."""
        self._start_scores(start)  # refused here, before anything trains, if it does not fit
        self._start = start

    def _start_scores(self, start: StartState | None) -> dict[str, torch.Tensor]:
        if start is None:
            return {}
        spread = f"pattern {self.config.pattern}" if self.config.nm else self.config.distribution
        asks = f"sparsity {self.config.sparsity:g} ({spread})"
        return start_scores(self.targets, self.budgets, start, self.seed, asks)

    @torch.no_grad()
    def initialize(self, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed)
        scores, self._start = self._start_scores(self._start), None
        given = {id(t.weight): scores.get(t.name) for t in self.targets}
        self.weight_masks.set_first(
            lambda w: self._initial_scores(w, generator, given[id(w)]), restarts
        )
        return {}

    def _initial_scores(
        self, w: torch.Tensor, generator: torch.Generator, given: torch.Tensor | None = None
    ) -> torch.Tensor:
        if given is not None:  # the export's mask
            return given
        if self.config.init == "magnitude":
            return w.detach().abs()
        return random_scores(w.shape, generator).to(w.device)

    @torch.no_grad()
    def prune_and_grow(self, fraction: float, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        grown = [
            self._update_layer(index, t, fraction, restarts) for index, t in enumerate(self.targets)
        ]
        self._grad_sum.clear()
        return {"regrown": sum(grown)}

    @torch.no_grad()
    def _update_layer(
        self, index: int, t: Target, fraction: float, restarts: OptimizerRestarts | None
    ) -> int:
        """Prune and grow one layer (as many grown as pruned); return the number grown."""
        mask = self.weight_masks.masks[t.name]
        active = self.budgets[index]  # exact by construction, no need to count
        n_swap = min(math.ceil(fraction * active), active, mask.numel() - active)
        if n_swap == 0:
            return 0
        w = t.weight
        # Scores are built with arithmetic on 0/1 float masks: exact, and far faster on a CPU
        # than torch.where with a scalar.
        inactive = 1.0 - self.weight_masks.keep[t.name]
        # Prune: the n_swap smallest-magnitude active weights (inactive ones score the dtype's max).
        far = torch.finfo(w.dtype).max
        pruned = topk_mask(w.abs().add_(inactive, alpha=far), n_swap, largest=False)
        kept = mask ^ pruned  # pruned is a subset of mask
        survivors = as_float(kept, w.dtype)
        # Grow: the best n_swap of everything not kept (just-pruned positions compete too).
        if self.config.grow == "gradient":
            grad = self._grad_sum.get(t.name)
            # A batch whose fp16 gradients overflowed (a step GradScaler skipped) carries no
            # usable ranking; treat its non-finite entries as 0 rather than as the largest.
            # The sum is ours (cleared after the update): score it in place.
            score = (
                grad.abs_().nan_to_num_(0.0, posinf=0.0)
                if grad is not None
                else torch.zeros_like(w)
            )
        else:
            # One generator per (update, layer): the draw does not depend on the other layers.
            generator = torch.Generator().manual_seed(
                self.seed + 1_000_003 * (self.updates_done + 1) + index
            )
            score = random_scores(w.shape, generator).to(w.device)
        if self.config.nm:  # each group grows back what it lost: exactly N again
            grown = nm_grow_mask(score, kept, *self.config.nm)
        else:
            grown = topk_mask(score.mul_(1.0 - survivors).sub_(survivors), n_swap)  # kept: -1
        # Only kept weights carry over: pruned and grown ones (a just-pruned weight that won its
        # place back included) are exactly 0; pruned ones get zeroed optimizer state, grown ones
        # a fresh optimizer's.
        w.mul_(survivors)
        zero_and_restart(restarts, pruned=[(w, pruned)], grown=[(w, grown)])
        self.weight_masks.set(t.name, kept ^ grown)  # disjoint: grown excludes kept
        return n_swap

    # --- reporting and resume --------------------------------------------------------------
    def masks_owned(self) -> list[str]:
        return self.weight_masks.owned()

    def masks(self) -> dict[str, torch.Tensor]:
        return self.weight_masks.by_parameter()

    def state_dict(self) -> dict[str, Any]:
        return {
            "initialized": self.initialized,
            "updates_done": self.updates_done,
            "deferred": self.deferred,
            "masks": self.weight_masks.state_dict(),
            "grad_sum": {k: v.cpu() for k, v in self._grad_sum.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight_masks.load_state_dict(state["masks"])
        self.initialized = bool(state["initialized"])
        self.updates_done = int(state["updates_done"])
        if self.initialized:
            self._start = None  # the masks are the checkpoint's
        self.deferred = state["deferred"]
        weights = {t.name: t.weight for t in self.targets}
        self._grad_sum = {k: v.to(weights[k].device) for k, v in state.get("grad_sum", {}).items()}
