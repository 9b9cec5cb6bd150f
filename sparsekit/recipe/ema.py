"""`training.ema`: an exponential moving average of the weights, evaluated beside the model.

The average is timm's `ModelEmaV3` (the DeiT/SViTE reference keeps `ModelEma(model,
decay=0.99996)`, updated after every optimizer step); sparsekit keeps it exactly as sparse as
the model (`sparsekit/train/ema.py`). This is its pure-data config.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from sparsekit.recipe.span import Span
from sparsekit.recipe.strict import Strict

_WARMUP_FIELDS = ("warmup_power", "warmup_gamma")


class Ema(Strict):
    """A moving average of the weights, updated after every optimizer step."""

    decay: float = Field(
        0.99996,
        gt=0,
        lt=1,
        description="Weight of the old average at each step: ema = decay x ema + (1 - decay) x "
        "model (the reference's 0.99996 averages over about 25,000 steps).",
    )
    start: Span = Field(
        Span(0, "epochs"),
        description="Until this point the average is a copy of the model; it averages after it.",
    )
    warmup: bool = Field(
        False,
        description="Ramp the decay up instead of using it from the start: at t steps after "
        "start, 1 - (1 + t / warmup_gamma) ** -warmup_power, capped at decay (timm's use_warmup).",
    )
    warmup_power: float = Field(
        2 / 3, gt=0, le=10, description="With warmup: how fast the decay ramps up."
    )
    warmup_gamma: float = Field(
        1.0, gt=0, le=1e9, description="With warmup: the ramp's time scale, in steps."
    )

    @model_validator(mode="after")
    def _warmup_fields_need_warmup(self) -> Ema:
        # By value, not by the fields given: recipe.yaml holds every default, written out.
        unused = [
            name
            for name in _WARMUP_FIELDS
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if unused and not self.warmup:
            raise ValueError(
                f"{' and '.join(unused)} only {'shape' if len(unused) > 1 else 'shapes'} the "
                f"ramp of warmup: true, which is off; set warmup: true, or leave out "
                f"{' and '.join(unused)}"
            )
        return self

    def describe(self) -> str:
        """One line for people: the decay, the start and the ramp."""
        parts = [f"EMA decay {self.decay:g}"]
        if self.start.value:
            parts.append(f"from {self.start}")
        if self.warmup:
            parts.append(f"warm-up power {self.warmup_power:g}, gamma {self.warmup_gamma:g}")
        return ", ".join(parts)
