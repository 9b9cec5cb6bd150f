"""The pydantic settings every recipe section shares: unknown keys, NaN and infinity refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A recipe section: a typo in a key is an error, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
