"""What an export says about itself: stored as JSON in the safetensors metadata (authoritative)
and copied to `config.json` (under `sparsekit`, beside timm's own fields) for people and tools.
Tensors only, no pickles, no code.

One SHA-256 (`sha256`) covers the manifest and the tensors together, so that editing either
after export is detected. It is an integrity check, not a signature: whoever can edit the file
can also recompute the hash. What a manifest may ask timm to build is bounded separately
(`sparsekit.models.check_spec`), whether or not its hash is right.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsekit.hashing import tensors_sha256
from sparsekit.models import MAX_MLP_RATIO, MAX_STR_LEN, MODEL_ARG_BOUNDS

FORMAT_VERSION = 3
# Versions this sparsekit reads: format 2 (all tensors dense, no preprocessing) loads as it was.
READABLE_VERSIONS = (2, 3)
METADATA_KEY = "sparsekit"
# Fields added after format 2, left out of the hash while at their defaults (empty or null), so
# that a format-2 export keeps the hash it was written with.
ADDED_FIELDS = ("compressed", "preprocessing", "nm_layers")  # and BlockShape.branches

MAX_BLOCKS = MODEL_ARG_BOUNDS["depth"][1]
MAX_HEADS = MODEL_ARG_BOUNDS["num_heads"][1]
MAX_WIDTH = MODEL_ARG_BOUNDS["embed_dim"][1]
MAX_MLP_HIDDEN = int(MAX_WIDTH * MAX_MLP_RATIO)
MAX_BRANCHES = 4  # timm builds ParallelThingsBlock with 2; no model argument sets it
SHA256 = r"^[0-9a-f]{64}$"
NM_PATTERN = r"^[0-9]{1,3}:[0-9]{1,3}$"
UNSEALED = "0" * 64  # the `sha256` of a manifest before `sealed` computes it


class BranchShape(BaseModel):
    """What one branch of a block with parallel attentions and MLPs kept (timm's
    `ParallelThingsBlock`: branch j is `attns.j` and `ffns.j`)."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(ge=1, le=MAX_HEADS)
    mlp_hidden: int = Field(ge=1, le=MAX_MLP_HIDDEN)


class BlockShape(BaseModel):
    """What one transformer block kept: in all, and per branch for a block with parallel
    branches (`branches`, null for any other block)."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(ge=1, le=MAX_HEADS * MAX_BRANCHES)
    head_dim: int = Field(ge=1, le=MAX_WIDTH)
    mlp_hidden: int = Field(ge=1, le=MAX_MLP_HIDDEN * MAX_BRANCHES)
    branches: list[BranchShape] | None = Field(None, min_length=1, max_length=MAX_BRANCHES)


class TokenSelector(BaseModel):
    """A token selector of the model: gathers the best `keep_ratio` of the patch tokens that
    reach block `before_block`."""

    model_config = ConfigDict(extra="forbid")

    before_block: int = Field(ge=0, lt=MAX_BLOCKS)
    keep_ratio: float = Field(gt=0, le=1)


class Preprocessing(BaseModel):
    """How an image becomes the model's input at evaluation, in timm's data-config terms (what
    `timm.data.create_transform(is_training=False, ...)` takes), and where that came from."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["image_folder", "digits", "synthetic", "given", "assumed"] = Field(
        description="image_folder: the run's eval transform (recipe data section, the model's "
        "pretrained config); digits / synthetic: sparsekit's built-in tensors (see docs); "
        "given: passed to export_model; assumed: the model's pretrained config, unchecked."
    )
    input_size: tuple[
        Annotated[int, Field(ge=1, le=1024)],
        Annotated[int, Field(ge=1, le=8192)],
        Annotated[int, Field(ge=1, le=8192)],
    ]
    interpolation: Literal["bilinear", "bicubic", "nearest"]
    mean: list[Annotated[float, Field(ge=-10, le=10)]] = Field(min_length=1, max_length=1024)
    std: list[Annotated[float, Field(gt=0, le=10)]] = Field(min_length=1, max_length=1024)
    crop_pct: float = Field(gt=0, le=1)
    crop_mode: Literal["center", "squash", "border"] = "center"


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
    compressed: dict[
        Annotated[str, Field(max_length=1024)],
        Annotated[list[Annotated[int, Field(ge=0, le=2**40)]], Field(max_length=8)],
    ] = Field(
        {},
        max_length=100_000,
        description="Tensors stored as values plus bitmask (sparse_storage.py), with their shapes.",
    )
    preprocessing: Preprocessing | None = Field(
        None, description="The eval preprocessing; null in format 2 (then the model's own)."
    )
    nm_layers: dict[
        Annotated[str, Field(max_length=MAX_STR_LEN)], Annotated[str, Field(pattern=NM_PATTERN)]
    ] = Field(
        {},
        max_length=8 * MAX_BLOCKS + 2,
        description="Linear layers whose weights hold N:M sparsity along their inputs, by module "
        "name (checked on the tensors when exported; export/accelerate.py).",
    )
    sha256: str = Field(
        pattern=SHA256,
        description="Hash of every other field of the manifest (canonical JSON) and of every "
        "tensor's name, dtype, shape and data.",
    )


def canonical_json(manifest: Manifest) -> bytes:
    """The manifest without its `sha256`, as JSON with sorted keys and no whitespace: the same
    bytes for the same content, however the stored text was laid out."""
    fields = json.loads(manifest.model_dump_json(exclude={"sha256"}))
    for name in ADDED_FIELDS:
        if fields.get(name) == Manifest.model_fields[name].get_default():
            del fields[name]
    for block in fields["blocks"]:  # added later too: absent from a block without branches
        if block.get("branches") is None:
            block.pop("branches", None)
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
