"""kind: token_select (SViTE+), on the recipe side."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from sparsekit.recipe.phases.base import WindowedPhase
from sparsekit.recipe.strict import Strict

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class TokenPlacement(Strict):
    """One token selector: where it sits and what it keeps."""

    before_block: int = Field(0, ge=0, le=1000, description="Index of the block it precedes.")
    keep_ratio: float = Field(
        gt=0, le=1, description="Share of the patch tokens reaching it that it keeps."
    )


class TokenSelectPhase(WindowedPhase):
    """SViTE+: a learnable scorer keeps the most useful patch tokens before chosen blocks.

    Selection starts at `start` and stays on until the run ends; the Gumbel temperature anneals
    from `temperature_start` to `temperature_end` between `start` and `end`, geometrically or
    linearly (`temperature_decay`).
    """

    kind: Literal["token_select"]
    keep_ratio: float | None = Field(
        None, gt=0, le=1, description="One selector before `before_block` keeping this share."
    )
    before_block: int = Field(0, ge=0, le=1000, description="Where the single selector sits.")
    placements: list[TokenPlacement] = Field(
        [], description="Several selectors (instead of keep_ratio), each with its own ratio."
    )
    temperature_start: float = Field(10.0, gt=0, le=1e4, description="Gumbel temperature at start.")
    temperature_end: float = Field(0.1, gt=0, le=1e4, description="Gumbel temperature at end.")
    temperature_decay: Literal["geometric", "linear"] = Field(
        "geometric",
        description="How the temperature goes from temperature_start to temperature_end over "
        "[start, end]: geometric, or linear (the reference code's, over the whole run).",
    )

    modifier: ClassVar[str] = "sparsekit.modifiers.token_select"
    example: ClassVar[dict] = {"kind": "token_select", "keep_ratio": 0.7}
    lasts_to_end: ClassVar[bool] = True
    at_most_once: ClassVar[str | None] = (
        "they would select tokens twice. Keep one (it takes several placements)"
    )
    adds_parameters: ClassVar[bool] = True
    wants_validation_samples: ClassVar[bool] = True
    per_block: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_way_to_place(self) -> TokenSelectPhase:
        if (self.keep_ratio is None) == (not self.placements):
            raise ValueError(
                "give either keep_ratio (one selector, before before_block) or placements "
                "(a list of {before_block, keep_ratio}), not both and not neither"
            )
        blocks = [p.before_block for p in self.resolved()]
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"two selectors before the same block: {sorted(blocks)}")
        return self

    def resolved(self) -> list[TokenPlacement]:
        """The selectors, in block order."""
        if self.keep_ratio is not None:
            return [TokenPlacement(before_block=self.before_block, keep_ratio=self.keep_ratio)]
        return sorted(self.placements, key=lambda p: p.before_block)

    def describe(self, timeline: Timeline) -> str:
        where = ", ".join(
            f"keep {p.keep_ratio:g} before block {p.before_block}" for p in self.resolved()
        )
        return (
            f"{where}, temperature {self.temperature_start:g} -> {self.temperature_end:g} "
            f"{self.temperature_decay}"
        )
