"""Model names, local weights and supported architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from sparsekit.errors import SparsekitError
from sparsekit.models import ModelSpec, create_model, resolve_model_name
from sparsekit.surgery.targets import find_targets

SMALL = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}


@pytest.mark.parametrize(
    ("short", "full"),
    [
        ("deit_tiny", "deit_tiny_patch16_224"),
        ("deit_small", "deit_small_patch16_224"),
        ("deit_base", "deit_base_patch16_224"),
        ("vit_small", "vit_small_patch16_224"),
        ("deit3_small", "deit3_small_patch16_224"),
        ("vit_base_patch32_224", "vit_base_patch32_224"),
    ],
)
def test_short_names_resolve(short: str, full: str) -> None:
    assert resolve_model_name(short) == full


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(SparsekitError) as info:
        resolve_model_name("deit_smal")
    assert "deit_small" in str(info.value) and "Closest" in str(info.value)


def test_unsupported_architecture_fails_clearly() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(SparsekitError, match="not supported"):
        find_targets(model, ["qkv"])


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"]
)
def test_targets_found_by_role(name: str) -> None:
    model = timm.create_model(name, pretrained=False, **SMALL)
    found = find_targets(model, ["qkv", "proj", "fc1", "fc2", "patch_embed", "head"])
    names = [t.name for t in found]
    assert names.count("blocks.0.attn.qkv") == 1 and "blocks.1.mlp.fc2" in names
    assert "patch_embed.proj" in names and "head" in names
    assert len([t for t in found if t.role == "fc1"]) == 2
    if "distilled" in name:
        assert "head_dist" in names


def test_include_exclude_patterns() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
    found = find_targets(model, ["fc1", "fc2"], include=["blocks.1.*"], exclude=["*.fc2"])
    assert [t.name for t in found] == ["blocks.1.mlp.fc1"]
    with pytest.raises(SparsekitError, match="loosen the patterns"):
        find_targets(model, ["fc1"], include=["nothing.*"])


def test_checkpoint_roundtrip_and_mismatch(tmp_path: Path) -> None:
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    source = create_model(spec)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_model(spec, checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    other = ModelSpec("vit_tiny_patch16_224", {**SMALL, "depth": 3})
    with pytest.raises(SparsekitError, match="do not fit"):
        create_model(other, checkpoint=path)
    with pytest.raises(SparsekitError, match="safetensors"):
        create_model(spec, checkpoint=tmp_path / "w.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(SparsekitError, match="not a readable"):
        create_model(spec, checkpoint=bad)


def test_pretrained_offline_is_a_clear_error(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(SparsekitError, match="--checkpoint"):
        create_model(ModelSpec("vit_tiny_patch16_224", {"num_classes": 10}), pretrained=True)
