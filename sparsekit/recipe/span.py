"""A point or length on the training timeline, written in the unit that keeps a recipe portable.

Recipes say *when* things happen in epochs (`6`, `"6 epochs"`), in optimizer steps
(`"500 steps"`) or as a share of the whole run (`"80%"`). Percentages keep a shipped recipe's
shape when a user shortens the run with `--epochs`; steps are exact; epochs read naturally.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import core_schema

Unit = Literal["epochs", "steps", "fraction"]

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(epochs?|steps?)\s*$")
_HELP = "write epochs as a number (6 or '6 epochs'), steps as '500 steps', or a share of the run as '80%'"


@dataclass(frozen=True)
class Span:
    """A non-negative amount of training time in one unit."""

    value: float
    unit: Unit

    @classmethod
    def parse(cls, raw: Any) -> Span:
        """Parse the recipe spelling; raise ValueError with the accepted spellings."""
        if isinstance(raw, Span):
            return raw
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"expected a time on the training timeline, got {raw!r}; {_HELP}")
        if isinstance(raw, (int, float)):
            if not math.isfinite(raw) or raw < 0:
                raise ValueError(f"expected a finite, non-negative number of epochs, got {raw!r}")
            return cls(float(raw), "epochs")
        if match := _PERCENT.match(raw):
            percent = float(match.group(1))
            if percent > 100:
                raise ValueError(f"a share of the run is at most 100%, got {raw!r}")
            return cls(percent / 100.0, "fraction")
        if match := _WITH_UNIT.match(raw):
            value, unit = float(match.group(1)), match.group(2)
            if unit.startswith("step"):
                if value != int(value):
                    raise ValueError(f"steps are whole numbers, got {raw!r}")
                return cls(value, "steps")
            return cls(value, "epochs")
        raise ValueError(f"cannot read {raw!r} as a time; {_HELP}")

    def in_epochs(self, total_epochs: float) -> float | None:
        """This span in epochs, or None when it is given in steps (needs the dataset size)."""
        if self.unit == "epochs":
            return self.value
        if self.unit == "fraction":
            return self.value * total_epochs
        return None

    def to_steps(self, steps_per_epoch: int, total_steps: int) -> int:
        """This span as a whole number of optimizer steps."""
        if self.unit == "steps":
            return int(self.value)
        if self.unit == "fraction":
            return round(self.value * total_steps)
        return round(self.value * steps_per_epoch)

    def __str__(self) -> str:
        if self.unit == "fraction":
            return f"{self.value * 100:g}%"
        if self.unit == "steps":
            return f"{int(self.value)} step{'s' if self.value != 1 else ''}"
        return f"{self.value:g} epoch{'s' if self.value != 1 else ''}"

    def to_yaml(self) -> float | int | str:
        """The recipe spelling: a bare number for epochs, a string otherwise."""
        if self.unit == "epochs":
            return int(self.value) if self.value == int(self.value) else self.value
        return str(self)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda s: s.to_yaml()),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {
            "description": "Epochs as a number, or a string: '6 epochs', '500 steps', '80%'.",
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(%|epochs?|steps?)\s*$"},
            ],
        }
