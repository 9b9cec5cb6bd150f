"""The recipe format: validated, pure data (no torch), shared between teams like code.

A recipe is a `training` section and a list of `phases`. Each phase is discriminated on its
`kind`; new kinds are added by writing one more phase model and listing it in `Phase`.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sparsekit.errors import RecipeError
from sparsekit.recipe.cadence import MIN_STEPS_BETWEEN_UPDATES
from sparsekit.recipe.span import Span

Role = Literal["qkv", "proj", "fc1", "fc2", "patch_embed", "head"]
ROLES: tuple[str, ...] = Role.__args__
# How the share of units or weights replaced at each prune/grow update decays; formulas in
# sparsekit.modifiers.schedules.update_fraction and docs/recipes.md.
FractionDecay = Literal["cosine", "linear", "constant", "reference"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class Optimizer(_Strict):
    """The optimizer: AdamW (the DeiT/SViTE default) or SGD with momentum."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-4, gt=0, le=10, description="Peak learning rate, reached after warm-up.")
    weight_decay: float = Field(0.05, ge=0, le=1)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = False


class Schedule(_Strict):
    """Learning rate: linear warm-up, then cosine decay to `min_lr` at the end of the run."""

    kind: Literal["cosine"] = "cosine"
    warmup: Span = Field(Span(5, "epochs"), description="Length of the linear warm-up.")
    warmup_lr: float = Field(1e-6, ge=0, description="Learning rate at step 0.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the last step.")


class Training(_Strict):
    """How the network is trained; phases only decide what is sparse and when."""

    epochs: int = Field(300, gt=0, le=100_000)
    batch_size: int = Field(512, gt=0, le=1_000_000, description="Global batch size.")
    optimizer: Optimizer = Optimizer()
    schedule: Schedule = Schedule()
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth rate of the model.")
    grad_clip: float | None = Field(
        None, gt=0, description="Max global gradient norm; off if null."
    )
    seed: int = Field(0, ge=0, lt=2**32)
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN/inf loss: stop (the last checkpoint is kept), or skip the step "
        "(no optimizer step; the run stops after 10 skips in a row).",
    )
    compute: Literal["active", "masked"] = Field(
        "active",
        description="active: between updates, train only the kept heads, neurons and tokens "
        "(cheaper, same result); masked: full-size steps with masks.",
    )


class Targets(_Strict):
    """Which weights a phase acts on: roles, narrowed by glob patterns over module names."""

    roles: list[Role] = Field(
        ["qkv", "proj", "fc1", "fc2"],
        min_length=1,
        description="Weight roles: qkv, proj, fc1, fc2, patch_embed, head.",
    )
    include: list[str] = Field([], description="Keep only modules matching one of these globs.")
    exclude: list[str] = Field([], description="Drop modules matching one of these globs.")


class _Moment(_Strict):
    """What every phase has: a label and a start."""

    name: str | None = Field(None, description="Optional label shown in progress and tables.")
    start: Span = Field(Span(0, "epochs"), description="When the phase begins.")


class _Phase(_Moment):
    """A phase that acts over a window."""

    end: Span = Field(Span(1.0, "fraction"), description="When the phase ends.")


class DenseWarmupPhase(_Phase):
    """Dense training: no sparsity inside this window; sparse phases begin after it."""

    kind: Literal["dense_warmup"]


class UnstructuredDSTPhase(_Phase):
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
    update_every: Span | None = Field(
        None,
        description="Time between prune/grow updates; default 1 epoch (unless `updates` is given).",
    )
    updates: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Instead of update_every: this many updates, evenly spaced strictly inside "
        "the window (every ceil(window / (updates + 1)) steps), whatever the run's length.",
    )
    min_update_interval: Span = Field(
        Span(MIN_STEPS_BETWEEN_UPDATES, "steps"),
        description="Fewest optimizer steps between updates: a shorter interval (a shortened "
        "run) is raised to it, with a note. The default was chosen by measurement.",
    )
    update_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of active weights replaced at the first update."
    )
    fraction_decay: FractionDecay = Field(
        "cosine",
        description="cosine, linear, constant: from update_fraction to 0 over [start, end]; "
        "reference: the SViTE code's cosine over the whole run to 0.005.",
    )
    targets: Targets = Targets()


class MagnitudePrunePhase(_Moment):
    """One-shot magnitude pruning, the baseline dynamic sparse training is measured against.

    At `start` (usually after a dense warm-up) each layer keeps its budget of largest |w|; the
    mask then stays fixed until the run ends, so the rest of the run fine-tunes the pruned
    network. There is no `end`: nothing changes after the one pruning step.
    """

    kind: Literal["magnitude_prune"]
    start: Span = Field(Span(0, "epochs"), description="When the weights are pruned.")
    sparsity: float = Field(gt=0, lt=1, description="Share of target weights that are zero.")
    distribution: Literal["erk", "uniform"] = "erk"
    targets: Targets = Targets()

    @property
    def end(self) -> Span:
        """The mask lasts until the run ends."""
        return Span(1.0, "fraction")


class HeadPruneGrowPhase(_Phase):
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
    update_every: Span | None = Field(
        None,
        description="Time between prune/grow updates; default 1 epoch (unless `updates` is given).",
    )
    updates: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Instead of update_every: this many updates, evenly spaced strictly inside "
        "the window (every ceil(window / (updates + 1)) steps), whatever the run's length.",
    )
    min_update_interval: Span = Field(
        Span(MIN_STEPS_BETWEEN_UPDATES, "steps"),
        description="Fewest optimizer steps between updates: a shorter interval (a shortened "
        "run) is raised to it, with a note. The default was chosen by measurement.",
    )
    update_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of active units replaced at the first update."
    )
    fraction_decay: FractionDecay = Field(
        "cosine",
        description="cosine, linear, constant: from update_fraction to 0 over [start, end]; "
        "reference: the SViTE code's cosine over the whole run to 0.005.",
    )
    grow_batches: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Batches before each update that run full size to score inactive units.",
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


class TokenPlacement(_Strict):
    """One token selector: where it sits and what it keeps."""

    before_block: int = Field(0, ge=0, le=1000, description="Index of the block it precedes.")
    keep_ratio: float = Field(
        gt=0, le=1, description="Share of the patch tokens reaching it that it keeps."
    )


class TokenSelectPhase(_Phase):
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


PHASES = (
    DenseWarmupPhase,
    UnstructuredDSTPhase,
    MagnitudePrunePhase,
    HeadPruneGrowPhase,
    TokenSelectPhase,
)
Phase = Annotated[Union[PHASES], Field(discriminator="kind")]  # noqa: UP007 (built from a tuple)
PHASE_KINDS: tuple[str, ...] = tuple(p.model_fields["kind"].annotation.__args__[0] for p in PHASES)


class Recipe(_Strict):
    """A sparse training recipe."""

    version: Literal[1] = Field(1, description="Recipe format version.")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    training: Training = Training()
    phases: list[Phase] = Field([], description="What is sparse when; empty trains dense.")
