"""kind: head_prune_grow (S2ViTE), on the recipe side."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sparsekit.errors import RecipeError
from sparsekit.recipe import cadence
from sparsekit.recipe.cadence import FractionDecay
from sparsekit.recipe.phases.base import WindowedPhase
from sparsekit.recipe.span import Span

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class HeadPruneGrowPhase(WindowedPhase):
    """S2ViTE: structured prune-and-grow of attention heads, and optionally of MLP neurons.

    Each block keeps a fixed number of its heads (and neurons), given as a share (rounded down,
    see `kept_units`) or as an exact count; at every update the lowest-scoring
    active units (first-order Taylor importance) are switched off and as many of the best
    inactive ones (gradient at their gate) are switched on. Masks appear at `start` and stay
    until the run ends; `end` is when updates stop.
    """

    kind: Literal["head_prune_grow"]
    end: Span = Field(Span(0.8, "fraction"), description="When prune-and-grow updates stop.")
    head_density: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of each block's heads kept (the paper's attention density), rounded "
        "down; give this or heads.",
    )
    heads: int | None = Field(
        None, ge=1, le=1024, description="Heads each block keeps, exactly; instead of head_density."
    )
    mlp_density: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of each block's MLP neurons kept, rounded down; null (and no "
        "mlp_neurons): MLP whole.",
    )
    mlp_neurons: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="MLP neurons each block keeps, exactly; instead of mlp_density.",
    )
    min_heads: int = Field(1, ge=1, le=1024, description="Fewest heads any block keeps.")
    budget: Literal["per_block", "global"] = Field(
        "per_block",
        description="per_block: every block keeps the same share; global: units move between "
        "blocks, the total stays fixed.",
    )
    init: Literal["random", "magnitude"] = Field(
        "random", description="First mask: random, or the units with the largest weights."
    )
    update_every: Span | None = cadence.update_every_field()
    updates: int | None = cadence.updates_field()
    min_update_interval: Span = cadence.min_update_interval_field()
    update_fraction: float = cadence.update_fraction_field("units")
    fraction_decay: FractionDecay = cadence.fraction_decay_field()
    grow_batches: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Batches before each update that run full size to score inactive units.",
    )

    modifier: ClassVar[str] = "sparsekit.modifiers.head_prune_grow"
    example: ClassVar[dict] = {"kind": "head_prune_grow", "head_density": 0.5}
    lasts_to_end: ClassVar[bool] = True
    at_most_once: ClassVar[str | None] = (
        "they would gate the same heads at once. Keep one (it may prune both heads and MLP neurons)"
    )
    scheduled_updates: ClassVar[bool] = True
    per_block: ClassVar[bool] = True
    not_compilable: ClassVar[str | None] = (
        "its heads and neurons are scored by gradient hooks on per-sample gates made inside "
        "the forward pass, which torch.compile does not run (measured: other heads kept than "
        "the eager run's)"
    )

    @field_validator("heads")
    @classmethod
    def _heads_or_density(cls, heads: int | None, info: ValidationInfo) -> int | None:
        if heads is not None and info.data.get("head_density") is not None:
            raise ValueError(
                "give either head_density (a share of each block's heads) or heads (how many "
                "each block keeps), not both"
            )
        return heads

    @field_validator("mlp_neurons")
    @classmethod
    def _neurons_or_density(cls, neurons: int | None, info: ValidationInfo) -> int | None:
        if neurons is not None and info.data.get("mlp_density") is not None:
            raise ValueError(
                "give either mlp_density (a share of each block's MLP neurons) or mlp_neurons "
                "(how many each block keeps), not both"
            )
        return neurons

    @model_validator(mode="after")
    def _a_head_budget(self) -> HeadPruneGrowPhase:
        if self.head_density is None and self.heads is None:
            raise ValueError(
                "give head_density (a share of each block's heads, e.g. 0.5) or heads (how "
                "many each block keeps, e.g. 3)"
            )
        if self.heads is not None and self.heads < self.min_heads:
            raise ValueError(
                f"heads is {self.heads} but min_heads is {self.min_heads}: every block keeps "
                f"exactly {self.heads}, so lower min_heads to {self.heads} or raise heads"
            )
        return self

    @property
    def prunes_neurons(self) -> bool:
        """Whether the phase also prunes MLP neurons (mlp_density or mlp_neurons is given)."""
        return self.mlp_density is not None or self.mlp_neurons is not None

    def kept_units(self, kind: str, units: int) -> int:
        """How many of a block's `units` heads (`kind` "heads") or MLP neurons ("neurons") the
        phase keeps.

        An exact count (`heads`, `mlp_neurons`) is used as given. A density is rounded down,
        as the reference code does (`int(atten_head * atten_density)` and
        `int(channels * other_density)` in `Masking.structure_init_new`, SViTE
        dst_utils/core.py:643 and :699), except that a product within 1e-9 of a whole number
        counts as that number (so float noise such as 0.29 x 100 = 28.999... keeps 29). The
        result is at least `min_heads` for heads and 1 for neurons, and at most `units`.
        Neurons with neither field set are all kept.

        Raises:
            RecipeError: an exact count larger than the model's `units`.
            ValueError: an unknown `kind`.
        """
        if kind == "heads":
            exact, density, fewest, field, what = (
                self.heads,
                self.head_density,
                self.min_heads,
                "heads",
                "heads",
            )
        elif kind == "neurons":
            exact, density, fewest, field, what = (
                self.mlp_neurons,
                self.mlp_density,
                1,
                "mlp_neurons",
                "MLP neurons",
            )
        else:
            raise ValueError(f"unknown unit kind {kind!r}; use 'heads' or 'neurons'")
        if exact is not None:
            if exact > units:
                other = "head_density" if kind == "heads" else "mlp_density"
                raise RecipeError(
                    f"head_prune_grow asks for {field}: {exact} in every block, but this "
                    f"model's blocks have {units} {what}; give at most {units}, or a share with "
                    f"{other}."
                )
            count = exact
        elif density is None:
            return units
        else:
            count = math.floor(density * units + 1e-9)
        return min(units, max(fewest, count))

    def describe(self, timeline: Timeline) -> str:
        heads = f"{self.heads} per block" if self.heads is not None else f"{self.head_density:g}"
        mlp = ""
        if self.mlp_neurons is not None:
            mlp = f", MLP {self.mlp_neurons:,} per block"
        elif self.mlp_density is not None:
            mlp = f", MLP {self.mlp_density:g}"
        return f"heads {heads}{mlp} ({self.budget}), {cadence.describe_updates(self, timeline)}"
