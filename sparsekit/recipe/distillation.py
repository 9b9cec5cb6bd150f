"""`training.distillation`: knowledge distillation from a fixed teacher, as DeiT trains.

Pure data (no torch): the teacher is named by its timm model name and read from a local
weights file when the run starts (`train/distillation.py`), never downloaded. A relative
`teacher_weights` path resolves against the working directory of the run, as `--checkpoint`
and `--data` do: a recipe carries no folder of its own (it may be a dict, and the run folder
keeps a copy of it), and a path written into a recipe shared between teams names somebody's
machine, so give it where the run starts: `--set training.distillation.teacher_weights=PATH`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from sparsekit.recipe.strict import Strict

# The weights files a teacher is read from: those of `--checkpoint` (sparsekit.models, which
# imports torch, so the list is repeated here; a test keeps the two equal).
TEACHER_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Teacher arguments the data decides: a teacher must see the student's images and predict
# their classes.
DATA_DECIDES = ("num_classes", "in_chans", "img_size")
MAX_TEACHER_ARGS = 64
MAX_LIST_LEN = 16
MAX_STR_LEN = 256


class Distillation(Strict):
    """DeiT's distillation loss (facebookresearch/deit losses.py, `DistillationLoss`): the
    base loss on the class output, plus the teacher's supervision of the distillation output,
    weighted `(1 - alpha)` and `alpha`."""

    type: Literal["hard", "soft"] = Field(
        description="hard: cross-entropy against the teacher's top class (DeiT's best); soft: "
        "KL divergence to the teacher's distribution at temperature tau."
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation loss; the base loss gets 1 - alpha.",
    )
    tau: float = Field(
        1.0, gt=0, le=100, description="Softmax temperature of type: soft (unused by hard)."
    )
    teacher: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="timm model name of the teacher (any timm model, e.g. regnety_160).",
    )
    teacher_weights: str = Field(
        min_length=1,
        max_length=4096,
        description="Local weights file of the teacher (.safetensors, or .pth/.pt/.bin read "
        "weights-only), with a head for the data's classes; relative to the working directory.",
    )
    teacher_args: dict[str, Any] = Field(
        {},
        max_length=MAX_TEACHER_ARGS,
        description="timm keyword arguments of the teacher's architecture, as --model-arg "
        "(depth, patch_size, ...); num_classes, in_chans and img_size come from the data.",
    )

    @field_validator("teacher_weights")
    @classmethod
    def _weights_file(cls, value: str) -> str:
        if not value.lower().endswith(TEACHER_SUFFIXES):
            raise ValueError(
                f"the teacher is read from a weights file ending in {', '.join(TEACHER_SUFFIXES)}"
                "; save it with safetensors.torch.save_file(model.state_dict(), "
                "'teacher.safetensors') or torch.save(model.state_dict(), 'teacher.pth')"
            )
        return value

    @field_validator("teacher_args")
    @classmethod
    def _architecture_only(cls, value: dict) -> dict:
        for key in value:
            if not key.isidentifier() or len(key) > MAX_STR_LEN:
                raise ValueError(f"{key[:80]!r} is not a timm keyword argument name")
            if key in DATA_DECIDES:
                raise ValueError(
                    f"{key} is not set here: the teacher sees the student's images and predicts "
                    "their classes, so the data decides num_classes, in_chans and img_size"
                )
            items = value[key] if isinstance(value[key], list) else [value[key]]
            if len(items) > MAX_LIST_LEN or not all(_plain(v) for v in items):
                shown = repr(value[key])
                raise ValueError(
                    f"{key}={shown if len(shown) <= 80 else shown[:77] + '...'} is not a plain "
                    f"value: teacher arguments are numbers, booleans, null, strings of at most "
                    f"{MAX_STR_LEN} characters, or flat lists of at most {MAX_LIST_LEN} of them, "
                    "as --model-arg takes (mappings, nested lists, NaN and infinity are refused)"
                )
        return value

    def describe(self) -> str:
        """One line for `recipe show`."""
        how = "hard (teacher's top class)" if self.type == "hard" else f"soft (tau {self.tau:g})"
        args = "".join(f", {k}={v!r}" for k, v in self.teacher_args.items())
        return (
            f"distillation: {how}, alpha {self.alpha:g}, teacher {self.teacher}{args} from "
            f"{self.teacher_weights}"
        )


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_STR_LEN
