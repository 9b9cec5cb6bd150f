"""Preprocessing travels with the model: config.json holds timm's fields, a masked export stored
dense loads in plain timm (`local-dir:`) with the outputs of load_compact, and eval_transform
gives the eval transform the run trained with (an image-folder run), or what is true of the
built-in data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import apply_on_folder, digits_folder
from PIL import Image
from typer.testing import CliRunner

from sparsekit import load_recipe
from sparsekit.cli.main import app
from sparsekit.errors import SparsekitError
from sparsekit.export import export_model, load_compact, read_export
from sparsekit.export.preprocessing import built_in_preprocessing, data_config, eval_transform
from sparsekit.models import ModelSpec, create_model
from sparsekit.train.data import build_data
from sparsekit.train.transforms import folder_transforms

runner = CliRunner()
DATA = {
    "interpolation": "bilinear",
    "crop_pct": 0.8,
    "mean": [0.2, 0.3, 0.4],
    "std": [0.5, 0.6, 0.7],
}
RECIPE = {
    "name": "prep",
    "training": {"epochs": 1, "batch_size": 16, "schedule": {"warmup": 0}},
    "data": DATA,
    "phases": [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "2 steps",
            "min_update_interval": "1 steps",
        }
    ],
}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A run on digits written as PNG files, with a recipe data section; its image folder, and
    its masked export stored dense."""
    root = tmp_path_factory.mktemp("prep")
    data = digits_folder(root / "digits", per_class=4, val_per_class=2, size=16)
    run = root / "run"
    apply_on_folder(RECIPE, data, run)
    export = root / "export"
    result = runner.invoke(
        app, ["export", str(run), "--masked", "--storage", "dense", "-o", str(export)]
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert f"timm.create_model('local-dir:{export}', pretrained=True) loads it" in said
    return run, data, export


def val_images(data: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((data / "val").rglob("*.png"))]


def test_config_json_holds_timm_fields_and_the_manifest(folder_run) -> None:
    _, _, export = folder_run
    config = json.loads((export / "config.json").read_text())
    manifest, _ = read_export(export)
    assert config["architecture"] == "deit_tiny_patch16_224"
    assert config["num_classes"] == 10
    args = config["model_args"]
    assert args["img_size"] == [16, 16] and args["patch_size"] == 4 and args["depth"] == 2
    assert args["in_chans"] == 3 and "drop_path_rate" not in args
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, 16, 16]
    assert pre["interpolation"] == "bilinear" and pre["crop_pct"] == 0.8
    assert pre["mean"] == DATA["mean"] and pre["std"] == DATA["std"]
    assert pre["crop_mode"] == "center" and pre["num_classes"] == 10
    assert config["sparsekit"] == json.loads(manifest.model_dump_json())
    assert manifest.preprocessing.source == "image_folder"


def test_plain_timm_loads_a_masked_dense_export_with_load_compacts_outputs(folder_run) -> None:
    _, data, export = folder_run
    plain = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    ours = load_compact(export)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=plain))
    x = torch.stack([transform(image) for image in val_images(data)])
    assert x.shape == (20, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), ours(x))
    weight = plain.blocks[0].attn.qkv.weight
    assert 0.3 < float((weight == 0).float().mean()) < 0.7  # the masks came along


def test_eval_transform_is_the_runs_eval_transform(folder_run) -> None:
    run, data, export = folder_run
    recipe = load_recipe(run / "recipe.yaml")
    _, trained, _ = folder_transforms(recipe.data, "deit_tiny_patch16_224", 16)
    ours = eval_transform(export)
    assert str(ours) == str(trained)
    for image in val_images(data)[:4]:
        assert torch.equal(ours(image), trained(image))
    assert data_config(read_export(export)[0])["crop_pct"] == 0.8


def test_a_compressed_export_says_plain_timm_needs_dense_storage(folder_run, tmp_path) -> None:
    run, _, _ = folder_run
    result = runner.invoke(app, ["export", str(run), "--masked", "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "plain timm cannot load it (it has compressed tensors" in said
    assert "Plain timm loading needs --masked --storage dense" in said
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == DATA["mean"]  # the preprocessing is still there


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_record_the_statistics_the_run_normalised_by(seed) -> None:
    from sklearn.datasets import load_digits

    pre = built_in_preprocessing("digits", seed, (1, 8, 8))
    assert pre.source == "digits" and pre.input_size == (1, 8, 8) and pre.crop_pct == 1.0
    bundle = build_data("digits", 8, seed=seed)
    raw = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    normalised = (raw - pre.mean[0]) / pre.std[0]
    first = bundle.val.images[0]
    assert any(torch.allclose(first, image, atol=1e-5) for image in normalised)
    assert torch.allclose(bundle.train.images.mean(), torch.tensor(0.0), atol=1e-5)
    synthetic = built_in_preprocessing("synthetic", seed, (3, 32, 32))
    assert synthetic.mean == [0.0] * 3 and synthetic.std == [1.0] * 3


def test_own_loop_exports_record_given_or_assumed_preprocessing(tmp_path) -> None:
    spec = ModelSpec("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    state = create_model(spec).state_dict()
    assumed = export_model(spec, state, tmp_path / "a")
    assert assumed.preprocessing.source == "assumed"
    assert assumed.preprocessing.mean == [0.5] * 3  # timm's vit weights: mean and std 0.5
    given = export_model(
        spec, state, tmp_path / "g", preprocessing={"mean": [0.1] * 3, "std": [0.2] * 3,
        "interpolation": "bilinear", "crop_pct": 1.0},
    )  # fmt: skip
    assert given.preprocessing.source == "given"
    assert given.preprocessing.input_size == (3, 32, 32)
    assert "Normalize(mean=tensor([0.1000" in str(eval_transform(tmp_path / "g"))
    with pytest.raises(SparsekitError, match="preprocessing: .* at std"):
        export_model(spec, state, tmp_path / "bad", preprocessing={"std": [0.0], "mean": [0.0],
                     "interpolation": "bilinear", "crop_pct": 1.0})  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_a_one_channel_model_gets_one_channel_statistics(tmp_path) -> None:
    spec = ModelSpec("deit_tiny_patch16_224", dict(img_size=8, patch_size=4, depth=1, in_chans=1))
    manifest = export_model(spec, create_model(spec).state_dict(), tmp_path / "grey")
    mean = sum((0.485, 0.456, 0.406)) / 3  # DeiT's ImageNet mean, averaged as timm does
    assert manifest.preprocessing.mean == pytest.approx([mean])
    assert data_config(manifest)["input_size"] == (1, 8, 8)
    image = Image.new("L", (8, 8), 128)
    assert eval_transform(tmp_path / "grey")(image).shape == (1, 8, 8)
