"""kind: unstructured_dst (SViTE), on the recipe side."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sparsekit.recipe import cadence
from sparsekit.recipe.cadence import FractionDecay
from sparsekit.recipe.phases.base import WindowedPhase
from sparsekit.recipe.span import Span
from sparsekit.recipe.targets import Targets

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline

MAX_GROUP = 32  # the largest M of an N:M pattern: groups stay a few cache lines wide
_PATTERN = re.compile(r"^([0-9]{1,3}):([0-9]{1,3})$")


class UnstructuredDSTPhase(WindowedPhase):
    """SViTE: unstructured dynamic sparse training at a fixed parameter budget.

    Masks appear at `start` and stay until the run ends; `end` is when prune-and-grow updates
    stop (the paper stops them at 80% of the run).
    """

    kind: Literal["unstructured_dst"]
    end: Span = Field(Span(0.8, "fraction"), description="When prune-and-grow updates stop.")
    sparsity: float = Field(gt=0, lt=1, description="Share of target weights that are zero.")
    distribution: Literal["erk", "uniform"] = "erk"
    init: Literal["random", "magnitude"] = Field(
        "random",
        description="How the first mask is chosen: random, or largest |w| (after warm-up).",
    )
    prune: Literal["magnitude"] = "magnitude"
    grow: Literal["gradient", "random"] = Field(
        "gradient", description="gradient: RigL (largest |dL/dw|); random: SET."
    )
    grow_accumulation: int = Field(
        1, ge=1, le=10_000, description="Batches whose dense gradients are summed for growth."
    )
    update_every: Span | None = cadence.update_every_field()
    updates: int | None = cadence.updates_field()
    min_update_interval: Span = cadence.min_update_interval_field()
    update_fraction: float = cadence.update_fraction_field("weights")
    fraction_decay: FractionDecay = cadence.fraction_decay_field()
    targets: Targets = Targets()
    pattern: str | None = Field(
        None,
        description="N:M (e.g. '2:4'): exactly N non-zero of every M consecutive input weights "
        "of each row; null: unstructured.",
    )

    modifier: ClassVar[str] = "sparsekit.modifiers.unstructured_dst"
    example: ClassVar[dict] = {"kind": "unstructured_dst", "sparsity": 0.5}
    lasts_to_end: ClassVar[bool] = True
    masks_weights: ClassVar[bool] = True
    scheduled_updates: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _pattern_spreads_uniformly(cls, data: Any) -> Any:
        """With a pattern every layer holds N/M: an unset distribution means uniform (so a
        dumped recipe reads back the same); an explicit erk is refused by `_check_pattern`."""
        if isinstance(data, dict) and data.get("pattern") is not None:
            data = {"distribution": "uniform", **data}
        return data

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_is_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            hint = f" ({value // 60}:{value % 60} became {value})" if value >= 60 else ""
            raise ValueError(
                f"YAML reads an unquoted N:M as a base-60 number{hint}; quote it, e.g. "
                'pattern: "2:4"'
            )
        return value

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str | None, info: ValidationInfo) -> str | None:
        """N:M with 0 < N < M <= MAX_GROUP, the sparsity 1 - N/M, uniform, Linear roles only."""
        if value is None:
            return None
        match = _PATTERN.match(value)
        if match is None:
            raise ValueError('write N:M, e.g. "2:4" (2 of every 4 consecutive weights kept)')
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m <= MAX_GROUP:
            raise ValueError(
                f"{value} keeps {n} of every {m}; N:M needs 0 < N < M <= {MAX_GROUP} "
                '(NVIDIA\'s sparse tensor cores run "2:4")'
            )
        sparsity = info.data.get("sparsity")
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(
                f"{value} keeps {n}/{m} of the weights, a sparsity of {1 - n / m:g}, but "
                f"sparsity is {sparsity:g}; set sparsity: {1 - n / m:g} (the pattern fixes it) "
                "or pick a pattern whose N/M is 1 - sparsity"
            )
        if info.data.get("distribution") == "erk":
            raise ValueError(
                "distribution is erk, which gives layers different densities, but a pattern "
                f"holds every layer at {n}/{m}; leave distribution out (or set uniform)"
            )
        targets = info.data.get("targets")
        if targets is not None and "patch_embed" in targets.roles:
            raise ValueError(
                "targets.roles holds patch_embed, a convolution: a pattern runs along the "
                "input features of Linear weights; drop patch_embed from the roles"
            )
        return value

    @property
    def nm(self) -> tuple[int, int] | None:
        """The pattern as (N, M), or None when unstructured."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def describe(self, timeline: Timeline) -> str:
        spread = f"pattern {self.pattern}" if self.pattern else self.distribution
        return (
            f"sparsity {self.sparsity:g} ({spread}), grow {self.grow}, "
            f"{cadence.describe_updates(self, timeline)}, {self.targets.describe()}"
        )
