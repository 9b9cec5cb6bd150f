"""Which weights a phase acts on: roles of a ViT's Linear layers, narrowed by name patterns."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sparsekit.recipe.strict import Strict

Role = Literal["qkv", "proj", "fc1", "fc2", "patch_embed", "head"]
ROLES: tuple[str, ...] = Role.__args__


class Targets(Strict):
    """Which weights a phase acts on: roles, narrowed by glob patterns over module names."""

    roles: list[Role] = Field(
        ["qkv", "proj", "fc1", "fc2"],
        min_length=1,
        description="Weight roles: qkv, proj, fc1, fc2, patch_embed, head.",
    )
    include: list[str] = Field([], description="Keep only modules matching one of these globs.")
    exclude: list[str] = Field([], description="Drop modules matching one of these globs.")

    def describe(self) -> str:
        """For `recipe show`."""
        return f"roles {','.join(self.roles)}"
