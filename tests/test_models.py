"""Model names, local weights, supported architectures and the bounds on model specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from sparsekit.errors import SparsekitError
from sparsekit.models import (
    DENIED_MODEL_ARGS,
    ModelSpec,
    check_spec,
    create_model,
    resolve_model_name,
)
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


# Bounds on what a model spec may ask for: --model-arg, run folders and export manifests alike.


@pytest.mark.parametrize("key", sorted(DENIED_MODEL_ARGS))
def test_arguments_that_open_files_or_pick_devices_are_refused(key: str) -> None:
    with pytest.raises(
        SparsekitError, match="not a model argument sparsekit passes to timm"
    ) as info:
        create_model(ModelSpec("vit_tiny_patch16_224", {**SMALL, key: "meta"}))
    assert repr(key) in str(info.value) and "--checkpoint FILE.safetensors" in str(info.value)


def test_timm_signatures_have_no_unchecked_loader_arguments() -> None:
    """Every non-architecture argument of timm's factory and builder is denied (or harmless)."""
    import inspect

    from timm.models import build_model_with_cfg

    harmless = {"model_name", "scriptable", "exportable", "no_jit", "kwargs"}
    builder = {"model_cls", "variant"}  # set by the entrypoint, not by a caller
    for fn in (timm.create_model, build_model_with_cfg):
        params = set(inspect.signature(fn).parameters) - harmless - builder
        assert params <= DENIED_MODEL_ARGS, params - DENIED_MODEL_ARGS


def test_absurd_sizes_are_refused_before_anything_is_allocated() -> None:
    for key in ("depth", "embed_dim", "num_heads", "img_size", "num_classes", "in_chans"):
        with pytest.raises(SparsekitError, match=f"{key}=10000000 .* out of bounds") as info:
            create_model(ModelSpec("vit_tiny_patch16_224", {key: 10**7}))
        assert "before any memory is allocated" in str(info.value)
    for key in ("depth", "embed_dim"):
        with pytest.raises(SparsekitError, match=f"{key}=1000000 .* out of bounds"):
            check_spec(ModelSpec("deit_tiny_patch16_224", {key: 10**6}))
    # Within every bound, too large together: counted on the meta device, never allocated.
    huge = {"depth": 64, "embed_dim": 16384, "num_heads": 128}
    with pytest.raises(SparsekitError, match=r"206,\d{3},\d{3},\d{3} parameters") as info:
        create_model(ModelSpec("vit_tiny_patch16_224", huge))
    assert "nothing was allocated" in str(info.value)
    with pytest.raises(SparsekitError, match="mlp_ratio 1000 .* out of bounds"):
        check_spec(ModelSpec("vit_tiny_patch16_224", {"mlp_ratio": 1000}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 7}, "embed_dim=7: AssertionError: dim should be divisible by num_heads"),
        ({"num_heads": 5}, "num_heads=5: AssertionError"),
        ({"act_layer": "nope"}, "act_layer='nope': KeyError"),
        ({"global_pool": "nope"}, "global_pool='nope': AssertionError"),
        ({"drop_rate": 5.0}, "drop_rate=5.0: ValueError"),
        ({"bogus": 1}, "bogus=1: TypeError"),
        ({"depth": 2.5}, "depth=2.5 .* out of bounds"),
        ({"act_layer": {"name": "gelu"}}, "not a plain value"),
        ({"img_size": [[32, 32]]}, "not a plain value"),
        ({"drop_rate": float("nan")}, "not a plain value"),
        ({"weight_init": "x" * 1000}, "not a plain value"),
        ({"img_size": 1}, "images of 1 px but patches of 16 px"),
        ({"img_size": 8, "patch_size": 16}, "patch_size 16 is larger than img_size 8"),
        ({"img_size": [32, 16], "patch_size": [8, 32]}, "patch_size 8x32 is larger"),
        ({"use_naflex": True}, "NaFlexVit is not supported"),
    ],
)
def test_arguments_timm_refuses_are_sparsekit_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SparsekitError, match=message):
        create_model(ModelSpec("vit_tiny_patch16_224", kwargs))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope_model", "unknown model 'nope_model'"),
        ("deit_smal_patch16_224", "unknown model .* Closest timm ViTs: deit_small_patch16_224"),
        ("hf-hub:timm/vit_tiny_patch16_224", "unknown model 'hf-hub:"),
        ("local-dir:/tmp", "unknown model 'local-dir:"),
        ("resnet18", "resnet18 is not supported"),
    ],
)
def test_unknown_and_unsupported_model_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(SparsekitError, match=message):
        create_model(ModelSpec(name, SMALL))


def test_the_meta_check_leaves_a_normal_build_as_timm_makes_it() -> None:
    spec = ModelSpec("vit_tiny_patch16_224", {**SMALL, "img_size": [32, 32]})
    torch.manual_seed(0)
    built = create_model(spec)
    torch.manual_seed(0)
    plain = timm.create_model(spec.name, **spec.kwargs)
    assert built.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in built.state_dict().items())
    assert check_spec(spec) == sum(p.numel() for p in built.parameters())
    assert all(p.device.type == "cpu" for p in built.parameters())
