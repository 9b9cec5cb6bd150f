"""What a run started from an export (`sparsekit apply --init-from EXPORT`) gives its phases:
the export's weights at full size and the sparsity they carry, read once by
`sparsekit.init_from` and handed to every phase's `Modifier.start_from`. Plain data: a phase
reads it and keeps what it needs as its first state, never changes it.

An export holds baked weights only: its unstructured masks are its zeros, its dropped heads and
neurons are zero (masked) or absent (compacted, expanded back as zeros). Kept weights that the
baking zeroed, those inside dropped units, are lost: `start_scores` makes a phase's layer
budget up from there first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from sparsekit.errors import SparsekitError

if TYPE_CHECKING:
    from sparsekit.surgery.targets import Target
    from sparsekit.surgery.tokens import Placement

# A layer budget may differ from the export's non-zero count by this share (at least one
# weight) and still fit: kept weights that are exactly 0, and the ERK budgets of the other
# layers moving a little when a fresh classifier of another size joins them.
BUDGET_SLACK = 0.005


@dataclass(frozen=True)
class StartState:
    """The export at full size, by the names of the model a run trains."""

    source: str  # the export, for messages
    weights: dict[str, torch.Tensor]  # the full-size state dict, token scorers included
    unit_keeps: dict[str, torch.Tensor]  # every head and neuron group: True where kept
    dropped: dict[str, torch.Tensor]  # by parameter: the positions of the dropped units
    placements: tuple[Placement, ...] = field(default=())  # the token selectors

    def nonzero(self, parameter: str) -> torch.Tensor | None:
        """Where `parameter` is not zero in the export (None: it does not come from the export,
        like a fresh classifier)."""
        weight = self.weights.get(parameter)
        return None if weight is None else weight.ne(0)

    def loose_zeros(self, parameter: str) -> int:
        """Zeros of `parameter` outside the units the export dropped: its unstructured
        sparsity, which some phase must hold."""
        weight = self.weights.get(parameter)
        if weight is None:
            return 0
        zero = weight.eq(0)
        if parameter in self.dropped:
            zero &= ~self.dropped[parameter]
        return int(zero.sum())

    def without(self, parameters: set[str]) -> StartState:
        """The same state without some parameters (a classifier that starts fresh)."""
        return replace(
            self,
            weights={k: v for k, v in self.weights.items() if k not in parameters},
            dropped={k: v for k, v in self.dropped.items() if k not in parameters},
        )


def start_scores(
    targets: list[Target], budgets: list[int], start: StartState, seed: int, asks: str
) -> dict[str, torch.Tensor]:
    """For each target layer the export has, by module name: scores whose top `budget` is the
    export's mask there, for `WeightMasks.set_first`. Its non-zero weights come first (the
    largest first, should the budget be a little smaller), then the positions of units it
    dropped (whose kept weights the baking zeroed), then its other zeros in a seeded random
    order (kept weights that are exactly 0). Layers the export lacks are left out.

    Raises:
        SparsekitError: a layer whose budget (the phase `asks`, e.g. "sparsity 0.5 (erk)") is
            not within `BUDGET_SLACK` of the export's non-zero weights there, plus its dropped
            units' positions: the export was trained at another sparsity or distribution.
    """
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, torch.Tensor] = {}
    misfits: list[tuple[str, int, int]] = []
    nonzero_total = free_total = 0  # outside the dropped units
    for t, budget in zip(targets, budgets, strict=True):
        name = f"{t.name}.weight"
        weight = start.weights.get(name)
        if weight is None:
            continue
        nonzero = weight.ne(0)
        kept = int(nonzero.sum())
        dropped = start.dropped.get(name, torch.zeros_like(nonzero))
        nonzero_total += kept
        free_total += weight.numel() - int(dropped.sum())
        room = int((dropped & ~nonzero).sum())
        slack = max(1, math.ceil(BUDGET_SLACK * budget))
        if not kept - slack <= budget <= kept + room + slack:
            misfits.append((name, kept, budget))
            continue
        magnitude = weight.detach().abs().float()
        score = torch.rand(weight.shape, generator=generator) * 0.5
        score = torch.where(dropped, score + 1.0, score)
        score = torch.where(nonzero, 2.0 + magnitude / magnitude.max().clamp_min(1e-30), score)
        scores[t.name] = score.to(t.weight.device)
    if misfits:
        name, kept, budget = misfits[0]
        more = f" ({len(misfits) - 1} more layers differ too)" if len(misfits) > 1 else ""
        zero = 1 - nonzero_total / max(1, free_total)
        raise SparsekitError(
            f"its {asks} keeps {budget:,} weights of {name}, but the export has {kept:,} "
            f"non-zero there{more}; outside the heads and neurons it dropped, {zero:.1%} of the "
            "export's weights of this phase's targets are zero. Set the phase's sparsity and "
            "distribution to the ones the "
            "export was trained with, or hold the export's zeros as they are with a "
            "fixed_sparsity phase (recipes/finetune_export.yaml)."
        )
    return scores
