"""Write a trained model as safetensors: masked at full size, or compacted (pruned heads and
neurons physically removed) so the FLOPs saving is a saving in time and memory.

An export folder holds `model.safetensors` (tensors, sparse ones compressed where that is
smaller, plus the manifest in its metadata, under one hash with the tensors), `config.json`
(timm's config with the preprocessing, and a copy of the manifest; sparsekit never reads it back)
and `recipe.yaml`. The files are written in a temporary folder beside the target and moved into
place one by one, each in a single rename: an interrupted export never leaves a half-written
file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sparsekit.atomic import default_file_mode, remove_torn
from sparsekit.errors import SparsekitError
from sparsekit.exclusive import locked_folder, refuse_unless_ours
from sparsekit.export.accelerate import nm_marks, recipe_patterns
from sparsekit.export.baked import baked_model
from sparsekit.export.manifest import (
    FORMAT_VERSION,
    METADATA_KEY,
    UNSEALED,
    BlockShape,
    BranchShape,
    Manifest,
    Preprocessing,
    TokenSelector,
    sealed,
)
from sparsekit.export.preprocessing import (
    assumed_preprocessing,
    run_preprocessing,
    timm_config,
)
from sparsekit.export.sparse_storage import pack
from sparsekit.hashing import recipe_sha256
from sparsekit.models import ModelSpec
from sparsekit.run_folder.records import read_run_json
from sparsekit.run_folder.trained_run import open_run
from sparsekit.surgery.geometry import input_size
from sparsekit.surgery.layouts import block_shape, branch_shapes
from sparsekit.surgery.tokens import Placement
from sparsekit.version import __version__

EXPORT_FILES = ("model.safetensors", "config.json", "recipe.yaml")


@torch.no_grad()
def export_model(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    out: str | Path,
    masks: dict[str, torch.Tensor] | None = None,
    unit_masks: dict[str, torch.Tensor] | None = None,
    placements: list[Placement] | None = None,
    recipe_yaml: str | None = None,
    compact: bool = True,
    storage: str = "auto",
    preprocessing: Preprocessing | dict | None = None,
    nm_patterns: list[str] | tuple[str, ...] = (),
) -> Manifest:
    """Rebuild `spec` with the trained `state`, bake the masks in, remove dropped units when
    `compact`, and write the export to `out`.

    Args:
        spec: the timm model name and arguments the state belongs to.
        state: the trained model's `state_dict()` (token scorers included).
        masks: unstructured keep-masks by parameter name (`Session.masks()`).
        unit_masks: head and neuron keep-masks by block (`Session.unit_masks()`).
        placements: token selectors (`Session.token_placements()`).
        storage: `auto` stores each sparse tensor as values plus bitmask when that is smaller
            (sparse_storage.py); `dense` stores every tensor as it is (plain timm loads it).
        preprocessing: the eval preprocessing your images had (`Preprocessing` or its fields:
            mean, std, interpolation, crop_pct, ...); default: the model's pretrained config,
            recorded as `assumed`.
        nm_patterns: N:M patterns the masks were trained with ("2:4"); each masked Linear layer
            whose mask and weights hold one is marked in the manifest's `nm_layers`.
    """
    model = baked_model(spec, state, masks, unit_masks, placements, compact)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    packed = pack(tensors, storage)
    size = input_size(model)
    if preprocessing is None:
        preprocessing = assumed_preprocessing(spec.name, size)
    elif isinstance(preprocessing, dict):
        preprocessing = _given(preprocessing, size)
    else:  # the model's own input size, whatever the record says
        preprocessing = preprocessing.model_copy(update={"input_size": size})
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        sparsekit_version=__version__,
        model=spec.name,
        model_kwargs=spec.kwargs,
        compact=compact,
        blocks=block_shapes(model),
        token_selection=[
            TokenSelector(before_block=p.before_block, keep_ratio=p.keep_ratio)
            for p in placements or []
        ],
        recipe_sha256=recipe_sha256(recipe_yaml) if recipe_yaml else None,
        compressed=packed.compressed,
        preprocessing=preprocessing,
        nm_layers=nm_marks(model, masks or {}, nm_patterns),
        sha256=UNSEALED,
    )
    # One hash over the manifest and the tensors as they load (expanded).
    manifest = sealed(manifest, packed.loaded)
    _write(Path(out), packed.stored, manifest, recipe_yaml, timm_config(model, manifest))
    return manifest


def _given(fields: dict, size: tuple[int, int, int]) -> Preprocessing:
    """`export_model`'s `preprocessing` as fields, checked (input size: the model's)."""
    from pydantic import ValidationError

    try:
        return Preprocessing.model_validate({**fields, "input_size": size, "source": "given"})
    except ValidationError as err:
        first = err.errors()[0]
        raise SparsekitError(
            f"preprocessing: {first['msg']} at {'.'.join(str(p) for p in first['loc'])}; give "
            "timm's data-config fields (mean, std, interpolation, crop_pct, crop_mode)."
        ) from None


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """Heads, head width and MLP width of each block, read from the modules."""
    shapes = []
    for block in model.blocks:
        heads, head_dim, hidden = block_shape(block)
        branches = branch_shapes(block)
        if branches is not None:
            branches = [BranchShape(heads=h, mlp_hidden=m) for h, m in branches]
        shapes.append(
            BlockShape(heads=heads, head_dim=head_dim, mlp_hidden=hidden, branches=branches)
        )
    return shapes


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier sparsekit export and nothing else: only the export's
    files, and a `model.safetensors` whose metadata carries sparsekit's manifest (a Hugging Face
    model folder with its own `model.safetensors`, `config.json` and README is not one)."""
    from safetensors import safe_open

    names = {p.name for p in folder.iterdir()}
    if not names <= set(EXPORT_FILES) or "model.safetensors" not in names:
        return False
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # unreadable or not safetensors: not ours to replace
        return False


def _write(
    out: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    recipe_yaml: str | None,
    config: dict,
) -> None:
    refuse_unless_ours(
        out,
        is_export,
        is_file=f"{out} is a file; give -o a folder for the export.",
        not_ours=f"{out} holds files that are not an earlier sparsekit export (only "
        f"{', '.join(EXPORT_FILES)} written by sparsekit are replaced); nothing in it was "
        "touched. Give -o a new or empty folder.",
    )
    # Locked while it is written: a second writer is refused instead of deleting the first
    # one's temporary files.
    busy = (
        f"{out} is in use: another sparsekit process is exporting into it now. Wait for it to "
        "finish, or give -o another folder."
    )

    def cannot(reason: str) -> str:
        return (
            f"cannot write the export to {out} ({reason}); an earlier export there is "
            "untouched. Give -o a folder you can write, or free disk space."
        )

    try:
        with locked_folder(out, busy, cannot):
            _replace(out, tensors, manifest, recipe_yaml, config)
    except OSError as err:
        raise SparsekitError(cannot(err.strerror or str(err))) from None


def _replace(
    out: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    recipe_yaml: str | None,
    config: dict,
) -> None:
    remove_torn(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        text = manifest.model_dump_json(indent=2)
        save_file(tensors, tmp / "model.safetensors", metadata={METADATA_KEY: text})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "recipe.yaml").write_text(recipe_yaml or "", encoding="utf-8")
        for name in EXPORT_FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, default_file_mode())
        for name in EXPORT_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    compact: bool = True,
    best: bool = False,
    ema: bool = False,
    storage: str = "auto",
) -> Manifest:
    """Export the last checkpoint of a `sparsekit apply` run folder, or with `best` its
    checkpoint-best.pt (the epoch of the best validation accuracy); with `ema`, the
    checkpoint's moving average of the weights (training.ema), baked and compacted alike. The
    preprocessing recorded is the run's: its data source (run.json) and recipe `data` section."""
    run = open_run(Path(run_dir), best=best, ema=ema)
    preprocessing = run_preprocessing(
        read_run_json(Path(run_dir)).data, run.recipe.data, run.recipe.training.seed, run.spec
    )
    return export_model(
        run.spec,
        run.weights,
        out,
        run.masks,
        run.unit_masks,
        run.placements,
        run.recipe_yaml,
        compact=compact,
        storage=storage,
        preprocessing=preprocessing,
        nm_patterns=recipe_patterns(run.recipe),
    )
