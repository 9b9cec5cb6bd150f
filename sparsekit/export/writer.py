"""Write a trained model as safetensors: masked at full size, or compacted (pruned heads and
neurons physically removed) so the FLOPs saving is a saving in time and memory.

An export folder holds `model.safetensors` (tensors, plus the manifest in its metadata),
`config.json` (the manifest, for people) and `recipe.yaml`. The files are written in a temporary
folder beside the target and moved into place one by one, each in a single rename: an
interrupted export never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sparsekit.atomic import default_file_mode
from sparsekit.errors import SparsekitError
from sparsekit.export.manifest import (
    FORMAT_VERSION,
    METADATA_KEY,
    BlockShape,
    Manifest,
    tensors_sha256,
)
from sparsekit.models import ModelSpec
from sparsekit.surgery.compact import bake_

EXPORT_FILES = ("model.safetensors", "config.json", "recipe.yaml")


@torch.no_grad()
def export_model(
    model: nn.Module,
    out: str | Path,
    spec: ModelSpec,
    masks: dict[str, torch.Tensor] | None = None,
    unit_masks: dict[str, torch.Tensor] | None = None,
    recipe_yaml: str | None = None,
    compact: bool = True,
) -> Manifest:
    """Bake `masks` (by parameter name) and `unit_masks` (by block, as `Session.unit_masks()`)
    into `model`, remove dropped units when `compact`, and write the export to `out`.

    `model` must be a plain timm model (no sparsekit gates on it): build it from `spec` and
    load the trained weights. It is modified in place.
    """
    bake_(model, masks or {}, unit_masks or {}, compact)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from sparsekit import __version__

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        sparsekit_version=__version__,
        model=spec.name,
        model_kwargs=spec.kwargs,
        compact=compact,
        blocks=block_shapes(model),
        recipe_sha256=hashlib.sha256(recipe_yaml.encode()).hexdigest() if recipe_yaml else None,
        tensors_sha256=tensors_sha256(tensors),
    )
    _write(Path(out), tensors, manifest, recipe_yaml)
    return manifest


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """Heads, head width and MLP width of each block, read from the modules."""
    shapes = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        shapes.append(
            BlockShape(heads=attn.num_heads, head_dim=attn.head_dim, mlp_hidden=mlp.fc2.in_features)
        )
    return shapes


def _write(
    out: Path, tensors: dict[str, torch.Tensor], manifest: Manifest, recipe_yaml: str | None
) -> None:
    if out.exists() and not out.is_dir():
        raise SparsekitError(f"{out} is a file; give -o a folder for the export.")
    if out.is_dir() and any(out.iterdir()) and not (out / "model.safetensors").exists():
        raise SparsekitError(
            f"{out} is a folder that holds other files, not an earlier export; give -o a new or "
            "empty folder so nothing of yours is overwritten."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        text = manifest.model_dump_json(indent=2)
        save_file(tensors, tmp / "model.safetensors", metadata={METADATA_KEY: text})
        (tmp / "config.json").write_text(text + "\n", encoding="utf-8")
        (tmp / "recipe.yaml").write_text(recipe_yaml or "", encoding="utf-8")
        for name in EXPORT_FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, default_file_mode())
        out.mkdir(exist_ok=True)
        for name in EXPORT_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_run(run_dir: str | Path, out: str | Path, compact: bool = True) -> Manifest:
    """Export the last checkpoint of a `sparsekit apply` run folder."""
    from sparsekit.models import create_model
    from sparsekit.train.run_folder import open_run

    run = open_run(Path(run_dir))
    model = create_model(run.spec)
    model.load_state_dict(run.weights)
    return export_model(
        model, out, run.spec, run.masks, run.unit_masks, run.recipe_yaml, compact=compact
    )
