"""Unstructured keep-masks of a set of weights, and the invariants they keep at every step.

Each layer holds exactly its budget of kept weights (`masks.layer_budgets`). A masked weight is
exactly 0 after every optimizer step: its gradient is masked before the step, so Adam moments
and SGD momentum never accumulate there, and an optimizer that may move a zero weight anyway
gets the weights masked again after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sparsekit.surgery.masks import layer_budgets, topk_mask
from sparsekit.surgery.nm_masks import nm_budget, nm_topk_mask
from sparsekit.surgery.optimizer_state import keeps_zero_weights, zero_and_restart

if TYPE_CHECKING:
    from sparsekit.surgery.optimizer_state import OptimizerRestarts
    from sparsekit.surgery.targets import Target


class WeightMasks:
    """Keep-masks of `targets` at `sparsity`, spread over the layers by `distribution`, as bool
    masks (`masks`) and as 0/1 in each weight's dtype (`keep`), by layer name. With `pattern`
    (N, M) every group of M consecutive input weights keeps exactly N (`surgery.nm_masks`),
    which sets the sparsity to 1 - N/M."""

    def __init__(
        self,
        targets: list[Target],
        sparsity: float,
        distribution: str,
        pattern: tuple[int, int] | None = None,
    ):
        self.targets = targets
        self.pattern = pattern
        shapes = [tuple(t.weight.shape) for t in targets]
        self.budgets = (
            [nm_budget(s, *pattern) for s in shapes]
            if pattern
            else layer_budgets(shapes, sparsity, distribution)
        )
        self.masks: dict[str, torch.Tensor] = {}
        # The mask as 0/1 in the weight's dtype: multiplying by it is ~8x faster on CPU than
        # masked_fill_ with a bool mask, and it runs on every step.
        self.keep: dict[str, torch.Tensor] = {}
        self._dtypes = {t.name: t.weight.dtype for t in targets}

    @torch.no_grad()
    def set_first(
        self,
        score: Callable[[torch.Tensor], torch.Tensor],
        restarts: OptimizerRestarts | None,
    ) -> None:
        """Keep each layer's budget of highest `score(weight)` (ties broken by position), layer
        by layer in order (under a pattern, the N highest of each group); zero the dropped
        weights and their optimizer state."""
        for t, budget in zip(self.targets, self.budgets, strict=True):
            scores = score(t.weight)
            mask = (
                nm_topk_mask(scores, *self.pattern) if self.pattern else topk_mask(scores, budget)
            )
            self.set(t.name, mask)
        zero_and_restart(restarts, pruned=((t.weight, ~self.masks[t.name]) for t in self.targets))
        self.apply()

    def set(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask
        self.keep[name] = as_float(mask, self._dtypes[name])

    # --- around every optimizer step -------------------------------------------------------
    def mask_gradients(self) -> None:
        """Before the step: no gradient reaches a masked weight."""
        for t in self.targets:
            grad = t.weight.grad
            if grad is not None:
                grad.mul_(self.keep[t.name])

    def restore_after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After the step: masked weights back at 0, where the optimizer may have moved them."""
        if not keeps_zero_weights(optimizer):
            self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for t in self.targets:
            t.weight.mul_(self.keep[t.name])

    # --- reporting and resume --------------------------------------------------------------
    def owned(self) -> list[str]:
        """The masked parameters' names."""
        return [f"{t.name}.weight" for t in self.targets]

    def by_parameter(self) -> dict[str, torch.Tensor]:
        """The bool masks by parameter name (`blocks.0.attn.qkv.weight`)."""
        return {f"{name}.weight": mask for name, mask in self.masks.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.masks.items()}

    def load_state_dict(self, masks: dict[str, torch.Tensor]) -> None:
        """Take saved masks, each onto its weight's device; refuse masks of layers not here."""
        weights = {t.name: t.weight for t in self.targets}
        if set(masks) - set(weights):
            raise ValueError(
                f"checkpoint masks name layers this model lacks: "
                f"{sorted(set(masks) - set(weights))[:3]}"
            )
        for name, mask in masks.items():
            self.set(name, mask.to(weights[name].device, torch.bool))


def as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in `dtype`. Going through uint8 is exact and, on a CPU, about six
    times faster than converting the bool tensor directly."""
    return mask.view(torch.uint8).to(dtype)
