"""One-shot magnitude pruning, then fine-tuning with the mask fixed: the baseline a user would
otherwise pick, and the one SViTE's exploration is measured against.

It is unstructured DST without updates: the same layer budgets (ERK or uniform, exact counts),
the same masking of gradients and optimizer state, and a first mask that keeps each layer's
largest |w| at `start`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import register
from sparsekit.modifiers.unstructured_dst import UnstructuredDST
from sparsekit.recipe.schema import MagnitudePrunePhase
from sparsekit.timeline import Timeline


@register("magnitude_prune")
class MagnitudePrune(UnstructuredDST):
    """Prunes once at `start_step`; the mask stays until the run ends."""

    config: MagnitudePrunePhase

    @classmethod
    def build(cls, config: Any, model: nn.Module, timeline: Timeline, seed: int) -> Modifier:
        start, end = timeline.steps(config.start), timeline.total_steps
        # An update period as long as the window puts the first update at its end: none runs.
        return cls(config, model, start, end, cls.find(config, model), max(1, end - start), seed)

    def _accumulating(self, step: int) -> bool:
        return False  # nothing ever grows

    def _initial_scores(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return w.detach().abs()
