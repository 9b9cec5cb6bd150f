"""The recipe format: validated, pure data (no torch), shared between teams like code.

A recipe is a `training` section and a list of `phases`. Each phase is discriminated on its
`kind`; each kind's config lives in its own file in `recipe/phases/` (docs/architecture.md).
The phase classes are importable from here too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from sparsekit.recipe.cadence import FractionDecay
from sparsekit.recipe.data import Data
from sparsekit.recipe.distillation import Distillation
from sparsekit.recipe.ema import Ema
from sparsekit.recipe.phases import (
    PHASE_KINDS,
    PHASES,
    DenseWarmupPhase,
    HeadPruneGrowPhase,
    MagnitudePrunePhase,
    Phase,
    PhaseConfig,
    TokenPlacement,
    TokenSelectPhase,
    UnstructuredDSTPhase,
    WindowedPhase,
)
from sparsekit.recipe.span import Span
from sparsekit.recipe.strict import Strict
from sparsekit.recipe.targets import ROLES, Role, Targets

__all__ = [
    "PHASES",
    "PHASE_KINDS",
    "ROLES",
    "DenseWarmupPhase",
    "Distillation",
    "Ema",
    "FractionDecay",
    "HeadPruneGrowPhase",
    "MagnitudePrunePhase",
    "Optimizer",
    "Data",
    "Phase",
    "PhaseConfig",
    "Recipe",
    "Role",
    "Schedule",
    "Targets",
    "TokenPlacement",
    "TokenSelectPhase",
    "Training",
    "UnstructuredDSTPhase",
    "WindowedPhase",
]


class Optimizer(Strict):
    """The optimizer: AdamW (the DeiT/SViTE default) or SGD with momentum."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(
        5e-4,
        gt=0,
        le=10,
        description="Peak learning rate, reached after warm-up (scaled first with "
        "lr_scaling: linear).",
    )
    weight_decay: float = Field(0.05, ge=0, le=1)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = False
    lr_scaling: Literal["none", "linear"] = Field(
        "none",
        description="linear: the peak learning rate is lr x training.batch_size / "
        "lr_base_batch, DeiT's rule that the SViTE code keeps (lr 5e-4 at a global batch of "
        "512); none: lr as given.",
    )
    lr_base_batch: int = Field(
        512,
        gt=0,
        le=1_000_000,
        description="With lr_scaling: linear, the global batch at which lr applies unscaled.",
    )


class Schedule(Strict):
    """Learning rate: linear warm-up, then cosine decay to `min_lr` at the end of the run."""

    kind: Literal["cosine"] = "cosine"
    warmup: Span = Field(Span(5, "epochs"), description="Length of the linear warm-up.")
    warmup_lr: float = Field(1e-6, ge=0, description="Learning rate at step 0.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the last step.")


class Training(Strict):
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
    compile: bool = Field(
        False,
        description="Run the training forward and backward through torch.compile (the model "
        "the phases work on stays the eager one).",
    )
    accumulate: int = Field(
        1,
        ge=1,
        le=1024,
        description="Micro-batches per optimizer step: each process's share of batch_size "
        "runs forward and backward in this many parts (less memory, the same optimizer step).",
    )
    ema: Ema | None = Field(
        None,
        description="A moving average of the weights (timm's ModelEmaV3), kept exactly as sparse "
        "as the model and evaluated beside it every epoch; null: none.",
    )
    distillation: Distillation | None = Field(
        None,
        description="Knowledge distillation from a fixed teacher, DeiT's loss (hard or soft); "
        "null: none.",
    )

    @property
    def peak_lr(self) -> float:
        """The learning rate reached after warm-up: `optimizer.lr`, times the global batch over
        `optimizer.lr_base_batch` with `lr_scaling: linear` (the reference's
        `args.lr * args.batch_size * world_size / 512.0`, SViTE main.py; warmup_lr and min_lr
        are not scaled, as there)."""
        opt = self.optimizer
        if opt.lr_scaling == "linear":
            return opt.lr * self.batch_size / opt.lr_base_batch
        return opt.lr

    def describe_lr(self) -> str:
        """The peak learning rate as `recipe show` prints it, with the scaling spelled out."""
        opt = self.optimizer
        if opt.lr_scaling == "linear":
            return (
                f"lr {opt.lr:g} x {self.batch_size} / {opt.lr_base_batch} = {self.peak_lr:g} "
                "(lr_scaling: linear)"
            )
        return f"lr {opt.lr:g}"


class Recipe(Strict):
    """A sparse training recipe."""

    version: Literal[1] = Field(1, description="Recipe format version.")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    training: Training = Training()
    data: Data = Field(Data(), description="Augmentation and normalisation of image folders.")
    phases: list[Phase] = Field([], description="What is sparse when; empty trains dense.")
