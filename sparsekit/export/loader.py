"""Load an export back as a plain timm model: rebuilt from the manifest in its safetensors
metadata (model name, keyword arguments, heads and MLP width per block), never from pickles and
never from `config.json` (a copy for people)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.export.manifest import (
    METADATA_KEY,
    READABLE_VERSIONS,
    BlockShape,
    Manifest,
    export_sha256,
)
from sparsekit.export.sparse_storage import unpack
from sparsekit.models import ModelSpec, create_model
from sparsekit.surgery.compact import shrink_, unit_groups
from sparsekit.surgery.layouts import block_shape, branch_shapes, group_names
from sparsekit.surgery.tokens import Placement, TokenSelection


def read_export(path: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest and tensors of an export (its folder or its model.safetensors), checked:
    nothing is built from the manifest here, and it is returned only when its hash matches.

    Raises:
        SparsekitError: missing, truncated or corrupt file, not a sparsekit export, another
            format version, a damaged compressed tensor, or a manifest or tensors that do not
            match the hash in the metadata (computed over the tensors as expanded).
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise SparsekitError(
            f"{file} does not exist; give an export folder (made by `sparsekit export`) or its "
            "model.safetensors."
        )
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SparsekitError(
            f"{file} is not a readable safetensors file ({err}); it is truncated or corrupt. "
            "Export it again with `sparsekit export`."
        ) from None
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise SparsekitError(
            f"{file} has no sparsekit manifest in its metadata: it was not written by "
            "`sparsekit export`, so the pruned architecture cannot be rebuilt from it."
        )
    _check_version(file, raw)
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as err:
        raise SparsekitError(
            f"{file}: its sparsekit manifest is malformed ({err.errors()[0]['msg']} at "
            f"{'.'.join(str(p) for p in err.errors()[0]['loc'])}); export it again."
        ) from None
    tensors = unpack(file, tensors, manifest.compressed)  # compressed tensors expanded, checked
    if export_sha256(manifest, tensors) != manifest.sha256:
        raise SparsekitError(
            f"{file}: its manifest or tensors do not match the hash recorded when it was "
            "exported, so the file was modified or damaged after export (the hash covers the "
            "model name, model arguments, block shapes, token selectors and every tensor). "
            "Export it again from the run folder."
        )
    return manifest, tensors


def _check_version(file: Path, raw: str) -> None:
    """Refuse another format version by name, before its fields are checked against this
    format's (a format-1 manifest has no `sha256`)."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return  # not JSON: the manifest check says so
    if not isinstance(record, dict) or "format_version" not in record:
        return
    version = record["format_version"]
    if version not in READABLE_VERSIONS:
        wrote = record.get("sparsekit_version")
        wrote = wrote if isinstance(wrote, str) and len(wrote) <= 64 else "unknown"
        raise SparsekitError(
            f"{file} is export format {str(version)[:20]}; this sparsekit reads formats "
            f"{' and '.join(map(str, READABLE_VERSIONS))}. Use the sparsekit version that wrote "
            f"it ({wrote}) or export it again."
        )


def load_compact(path: str | Path, accelerate: bool | str = False) -> nn.Module:
    """Rebuild the exported model (compacted or masked) as a plain timm model in eval mode.

    With `accelerate` (True: float16, or "float16" / "bfloat16") the model is put on CUDA in
    that dtype and its 2:4 layers (the manifest's `nm_layers`, checked on the weights) become
    semi-structured sparse tensors (`export/accelerate.py`); it then runs inference only.

    Raises:
        SparsekitError: see `read_export`; also a manifest that does not fit its tensors, and
            with `accelerate` no CUDA GPU of compute capability 8.0+, or no 2:4 layer to convert.
    """
    manifest, tensors = read_export(path)
    model = built_export(path, manifest, tensors)
    if accelerate:
        from sparsekit.export.accelerate import accelerated

        model = accelerated(model, manifest.nm_layers, str(path), accelerate)
    return model


def _parts(path, i: int, shape: BlockShape, block: nn.Module, whole: tuple[int, int]) -> list:
    """Per attention and MLP of block `i` (one pair, or one per branch of a block with parallel
    branches): their group names, what the manifest says they keep (heads, hidden neurons) and
    what they hold at full size (`whole`: the block's heads and hidden neurons in all).

    Raises:
        SparsekitError: branches that do not match the block's, or that do not add up to it.
    """
    heads, hidden = whole
    full = branch_shapes(block)
    if full is None:
        if shape.branches is not None:
            raise SparsekitError(
                f"{path}: block {i} lists parallel branches in the manifest, but it has none in "
                "the model its manifest describes; the file is inconsistent."
            )
        return [(group_names(i, block)[0], (shape.heads, shape.mlp_hidden), (heads, hidden))]
    kept = [(b.heads, b.mlp_hidden) for b in shape.branches or []]
    if shape.branches is None and (shape.heads, shape.mlp_hidden) == (heads, hidden):
        kept = full  # every unit kept (an export that predates per-branch counts)
    if (
        len(kept) != len(full)
        or any(k[0] > f[0] or k[1] > f[1] for k, f in zip(kept, full, strict=False))
        or (sum(k[0] for k in kept), sum(k[1] for k in kept)) != (shape.heads, shape.mlp_hidden)
    ):
        raise SparsekitError(
            f"{path}: block {i} has {len(full)} parallel branches of {full} (heads, MLP width), "
            f"but its manifest says {kept} for a block total of {shape.heads} heads and "
            f"{shape.mlp_hidden} neurons; the file is inconsistent."
        )
    return list(zip(group_names(i, block), kept, full, strict=True))


def _head_units(path, model: nn.Module, kept: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per attention named in `kept` (its kept and its full number of query heads), the units
    that keep them: as many, or with grouped-query attention the key/value groups that hold
    them."""
    groups = unit_groups(model, list(kept)) if kept else {}
    units = {}
    for name, (heads, full) in kept.items():
        per_unit = full // groups[name].units
        if heads % per_unit:
            raise SparsekitError(
                f"{path}: {name} keeps {heads} heads in the manifest, but its heads come in "
                f"key/value groups of {per_unit}; the file is inconsistent."
            )
        units[name] = heads // per_unit
    return units


def built_export(
    path: str | Path, manifest: Manifest, tensors: dict[str, torch.Tensor]
) -> nn.Module:
    """The model of a checked export (`read_export`'s manifest and tensors), built and loaded as
    `load_compact` returns it; for callers that need the manifest too (`--init-from`).

    Raises:
        SparsekitError: a model the bounds refuse, or a manifest that does not fit its tensors.
    """
    try:  # the same bounds as any model spec: a correct hash does not make a manifest safe
        model = create_model(ModelSpec(manifest.model, manifest.model_kwargs))
    except SparsekitError as err:
        raise SparsekitError(
            f"{path}: its manifest asks for a model sparsekit does not build: {err}"
        ) from None
    if len(manifest.blocks) != len(model.blocks):
        raise SparsekitError(
            f"{path}: the manifest lists {len(manifest.blocks)} blocks but {manifest.model} "
            f"with its arguments has {len(model.blocks)}; the file is inconsistent."
        )
    sizes: dict[str, int] = {}
    kept_heads: dict[str, tuple[int, int]] = {}
    for i, (shape, block) in enumerate(zip(manifest.blocks, model.blocks, strict=True)):
        heads, head_dim, hidden = block_shape(block)
        if shape.head_dim != head_dim:
            raise SparsekitError(
                f"{path}: block {i} has head width {shape.head_dim} in the manifest but "
                f"{head_dim} in {manifest.model}; the file is inconsistent."
            )
        if shape.heads > heads or shape.mlp_hidden > hidden:
            raise SparsekitError(
                f"{path}: block {i} keeps {shape.heads} heads and an MLP width of "
                f"{shape.mlp_hidden} in the manifest, more than the {heads} and {hidden} of "
                f"{manifest.model}; the file is inconsistent."
            )
        parts = _parts(path, i, shape, block, (heads, hidden))
        for (attn, mlp), (kept, kept_hidden), (full, full_hidden) in parts:
            if kept != full:
                kept_heads[attn] = (kept, full)
            if kept_hidden != full_hidden:
                sizes[mlp] = kept_hidden
    sizes.update(_head_units(path, model, kept_heads))
    if sizes:
        shrink_(model, sizes)
    if manifest.token_selection:
        placements = [Placement(t.before_block, t.keep_ratio) for t in manifest.token_selection]
        try:
            TokenSelection(model, placements)
        except SparsekitError as err:
            raise SparsekitError(f"{path}: {err}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise SparsekitError(
            f"{path}: its tensors do not fit the architecture its manifest describes "
            f"({' '.join(s.strip() for s in first)}); the file is inconsistent."
        ) from None
    return model.eval()
