"""Preprocessing travels with the model: what an image goes through before an export sees it,
recorded as the run's training prepared it, written into `config.json` in timm's own terms (so
`timm.create_model("local-dir:EXPORT")` and `timm.data.resolve_data_config` read it), and given
back as timm's eval transform for any export (`eval_transform`)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from sparsekit.export.manifest import Manifest, Preprocessing
from sparsekit.models import ModelSpec
from sparsekit.recipe.data import Data

BUILT_IN = ("digits", "synthetic")


def folder_preprocessing(
    data: Data, model_name: str, size: tuple[int, int, int], source: str = "image_folder"
) -> Preprocessing:
    """The eval preprocessing of an image-folder run: the recipe's `data` section, and what it
    leaves unset from the model's pretrained config (`train/transforms.py` builds the run's
    transforms from this, so the export records what evaluation used)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(model_name)
    own = resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else None)
    interpolation = data.interpolation or own["interpolation"]
    return Preprocessing(
        source=source,
        input_size=size,
        # "random" is a training-time choice: evaluation resizes bicubic, as DeiT's
        interpolation="bicubic" if interpolation == "random" else interpolation,
        mean=_per_channel(data.mean or own["mean"], size[0]),
        std=_per_channel(data.std or own["std"], size[0]),
        crop_pct=data.crop_pct or own["crop_pct"],
    )


def _per_channel(values, channels: int) -> list[float]:
    """Statistics for `channels` inputs: as given when they fit, else their average for every
    channel (timm's policy when pretrained statistics do not match the model's channels)."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    return [sum(values) / len(values)] * channels


def built_in_preprocessing(source: str, seed: int, size: tuple[int, int, int]) -> Preprocessing:
    """What is true of sparsekit's built-in sets, which are tensors, not image files.

    digits: scikit-learn's 8x8 digits, pixel values 0..16 scaled to [0, 1] (as `ToTensor` scales
    0..255), then normalised by the training split's own mean and std (`train/data.py`, the
    same split for the same seed), resized bilinearly. synthetic: random tensors used as they
    are (mean 0, std 1); no image turns into them, the record only says so.
    """
    channels = size[0]
    if source == "synthetic":
        return Preprocessing(
            source="synthetic",
            input_size=size,
            interpolation="bilinear",
            mean=[0.0] * channels,
            std=[1.0] * channels,
            crop_pct=1.0,
        )
    mean, std = digits_statistics(seed)
    return Preprocessing(
        source="digits",
        input_size=size,
        interpolation="bilinear",
        mean=[mean] * channels,
        std=[std] * channels,
        crop_pct=1.0,
    )


def digits_statistics(seed: int) -> tuple[float, float]:
    """The mean and std `train/data.py` normalises the digits by: of the training split drawn
    with `seed`, pixels scaled to [0, 1]."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    idx_train, _ = train_test_split(
        range(len(digits.target)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return float(images[idx_train].mean()), float(images[idx_train].std())


def run_preprocessing(data_source: str, data: Data, seed: int, spec: ModelSpec) -> Preprocessing:
    """The eval preprocessing of a run of `spec` trained on `data_source` (run.json's `data`)
    under a recipe with this `data` section and `seed`."""
    size = spec_input_size(spec.name, spec.kwargs)
    if data_source in BUILT_IN:
        return built_in_preprocessing(data_source, seed, size)
    return folder_preprocessing(data, spec.name, size)


def assumed_preprocessing(model_name: str, size: tuple[int, int, int]) -> Preprocessing:
    """The model's own pretrained config, for an export that does not say how its images were
    prepared (a format-2 export, or `export_model` without `preprocessing`)."""
    return folder_preprocessing(Data(), model_name, size, source="assumed")


def timm_config(model: nn.Module, manifest: Manifest) -> dict[str, Any]:
    """`config.json` as timm writes it for `model` (`save_config_for_hf`: `architecture`,
    `num_classes`, `model_args`, `pretrained_cfg` with the preprocessing), plus the sparsekit
    manifest under `sparsekit` (a copy; the safetensors metadata holds the authoritative one)."""
    from timm.models._hub import save_config_for_hf

    assert manifest.preprocessing is not None
    pre = manifest.preprocessing.model_dump(exclude={"source"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, str(path), model_args=manifest.model_kwargs, data_config=pre)
        config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate"):
        config.get("model_args", {}).pop(key, None)  # training noise, not the architecture
    config["sparsekit"] = json.loads(manifest.model_dump_json())
    return config


def plain_timm_refusal(manifest: Manifest) -> str | None:
    """Why `timm.create_model("local-dir:EXPORT", pretrained=True)` cannot load this export, or
    None when it can (a masked export, every tensor dense, no token selectors)."""
    reasons = []
    if manifest.compact:
        reasons.append("it is compacted (export with --masked)")
    if manifest.compressed:
        reasons.append("it has compressed tensors (export with --storage dense)")
    if manifest.token_selection:
        reasons.append("it has token selectors, which are not timm modules")
    return "; ".join(reasons) or None


def data_config(export: str | Path | Manifest) -> dict[str, Any]:
    """timm's data config (`resolve_data_config`) of an export (its folder, model.safetensors,
    or its manifest): input_size, interpolation, mean, std, crop_pct, crop_mode.

    Raises:
        SparsekitError: see `read_export`.
    """
    from timm.data import resolve_data_config

    from sparsekit.export.loader import read_export

    manifest = export if isinstance(export, Manifest) else read_export(export)[0]
    pre = manifest.preprocessing or assumed_preprocessing(
        manifest.model, spec_input_size(manifest.model, manifest.model_kwargs)
    )
    return resolve_data_config({}, pretrained_cfg=pre.model_dump(exclude={"source"}))


def eval_transform(export: str | Path | Manifest) -> Callable:
    """timm's eval transform for an export (`create_transform(**data_config, is_training=False)`):
    a PIL image in, the tensor the model was evaluated on out.

    Raises:
        SparsekitError: see `read_export`.
    """
    from timm.data import create_transform

    return create_transform(**data_config(export), is_training=False)


def spec_input_size(model_name: str, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of timm model `model_name` built with `kwargs`, without
    building it: its `in_chans` and `img_size`, else its pretrained config's."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    default = cfg.input_size if cfg else (3, 224, 224)
    img = kwargs.get("img_size", default[1:])
    img = (img, img) if isinstance(img, int) else tuple(img)
    return (int(kwargs.get("in_chans", default[0])), int(img[0]), int(img[1]))
