"""kind: dense_warmup, on the recipe side."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from sparsekit.recipe.phases.base import WindowedPhase

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class DenseWarmupPhase(WindowedPhase):
    """Dense training: no sparsity inside this window; sparse phases begin after it."""

    kind: Literal["dense_warmup"]

    modifier: ClassVar[str] = "sparsekit.modifiers.dense_warmup"
    example: ClassVar[dict] = {"kind": "dense_warmup", "end": "20%"}
    dense_window: ClassVar[bool] = True

    def describe(self, timeline: Timeline) -> str:
        return "dense"
