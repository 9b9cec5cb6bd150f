"""What an export says about itself: stored as JSON in the safetensors metadata (authoritative)
and copied to `config.json` for people. Tensors only, no pickles, no code."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
METADATA_KEY = "sparsekit"


class BlockShape(BaseModel):
    """What one transformer block kept."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    mlp_hidden: int = Field(ge=1)


class TokenSelector(BaseModel):
    """A token selector of the model: gathers the best `keep_ratio` of the patch tokens that
    reach block `before_block`."""

    model_config = ConfigDict(extra="forbid")

    before_block: int = Field(ge=0)
    keep_ratio: float = Field(gt=0, le=1)


class Manifest(BaseModel):
    """Everything `load_compact` needs to rebuild the model, and what it was made from."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    sparsekit_version: str
    model: str = Field(description="timm model name the export was built from.")
    model_kwargs: dict[str, Any] = Field(description="Keyword arguments of timm.create_model.")
    compact: bool = Field(description="Pruned heads and neurons physically removed.")
    blocks: list[BlockShape]
    token_selection: list[TokenSelector] = Field(
        [], description="Token selectors (their scorers are in the tensors)."
    )
    recipe_sha256: str | None = None
    tensors_sha256: str = Field(description="Hash of every tensor's name, dtype, shape and data.")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors that changes if any name, dtype, shape or value changes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
