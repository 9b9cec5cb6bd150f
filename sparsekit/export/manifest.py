"""What an export says about itself: stored as JSON in the safetensors metadata (authoritative)
and copied to `config.json` for people. Tensors only, no pickles, no code.

One SHA-256 (`sha256`) covers the manifest and the tensors together, so that editing either
after export is detected. It is an integrity check, not a signature: whoever can edit the file
can also recompute the hash. What a manifest may ask timm to build is bounded separately
(`sparsekit.models.check_spec`), whether or not its hash is right.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsekit.hashing import tensors_sha256
from sparsekit.models import MAX_MLP_RATIO, MAX_STR_LEN, MODEL_ARG_BOUNDS

FORMAT_VERSION = 2
METADATA_KEY = "sparsekit"

MAX_BLOCKS = MODEL_ARG_BOUNDS["depth"][1]
MAX_HEADS = MODEL_ARG_BOUNDS["num_heads"][1]
MAX_WIDTH = MODEL_ARG_BOUNDS["embed_dim"][1]
MAX_MLP_HIDDEN = int(MAX_WIDTH * MAX_MLP_RATIO)
SHA256 = r"^[0-9a-f]{64}$"
UNSEALED = "0" * 64  # the `sha256` of a manifest before `sealed` computes it


class BlockShape(BaseModel):
    """What one transformer block kept."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(ge=1, le=MAX_HEADS)
    head_dim: int = Field(ge=1, le=MAX_WIDTH)
    mlp_hidden: int = Field(ge=1, le=MAX_MLP_HIDDEN)


class TokenSelector(BaseModel):
    """A token selector of the model: gathers the best `keep_ratio` of the patch tokens that
    reach block `before_block`."""

    model_config = ConfigDict(extra="forbid")

    before_block: int = Field(ge=0, lt=MAX_BLOCKS)
    keep_ratio: float = Field(gt=0, le=1)


class Manifest(BaseModel):
    """Everything `load_compact` needs to rebuild the model, and what it was made from."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    sparsekit_version: str = Field(max_length=64)
    model: str = Field(
        max_length=MAX_STR_LEN, description="timm model name the export was built from."
    )
    model_kwargs: dict[str, Any] = Field(description="Keyword arguments of timm.create_model.")
    compact: bool = Field(description="Pruned heads and neurons physically removed.")
    blocks: list[BlockShape] = Field(max_length=MAX_BLOCKS)
    token_selection: list[TokenSelector] = Field(
        [], max_length=MAX_BLOCKS, description="Token selectors (their scorers are in the tensors)."
    )
    recipe_sha256: str | None = Field(None, pattern=SHA256)
    sha256: str = Field(
        pattern=SHA256,
        description="Hash of every other field of the manifest (canonical JSON) and of every "
        "tensor's name, dtype, shape and data.",
    )


def canonical_json(manifest: Manifest) -> bytes:
    """The manifest without its `sha256`, as JSON with sorted keys and no whitespace: the same
    bytes for the same content, however the stored text was laid out."""
    fields = json.loads(manifest.model_dump_json(exclude={"sha256"}))
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def export_sha256(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> str:
    """The integrity hash of an export: its manifest (every field but `sha256`, canonical JSON)
    and its tensors. Any change to either changes it."""
    text = canonical_json(manifest)
    digest = hashlib.sha256()
    digest.update(f"sparsekit-export|{len(text)}|".encode())
    digest.update(text)
    digest.update(tensors_sha256(tensors).encode())
    return digest.hexdigest()


def sealed(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Manifest:
    """`manifest` with `sha256` set for `tensors`, as `read_export` will recompute it."""
    stored = Manifest.model_validate_json(manifest.model_dump_json())  # as it will be read back
    return stored.model_copy(update={"sha256": export_sha256(stored, tensors)})
