"""Model names, local weights, supported architectures and the bounds on model specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from sparsekit.errors import SparsekitError, UsageError
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


@pytest.mark.parametrize(
    ("name", "roles"),
    [
        ("eva02_tiny_patch14_224", {"qkv": ["attn.qkv"], "fc1": ["mlp.fc1"]}),  # GluMlp
        ("eva02_large_patch14_clip_224", {"fc1": ["mlp.fc1_g", "mlp.fc1_x"]}),  # SwiGLU
        ("beit_base_patch16_224", {"qkv": ["attn.qkv"], "proj": ["attn.proj"]}),
        (
            "vit_small_patch16_18x2_224",
            {
                "qkv": ["attns.0.attn.qkv", "attns.1.attn.qkv"],
                "fc2": ["ffns.0.mlp.fc2", "ffns.1.mlp.fc2"],
            },
        ),
        (
            "vit_base_patch16_xp_224",
            {"qkv": ["in_proj"], "proj": ["attn_out_proj"], "fc2": ["mlp_out_proj"]},
        ),
        ("vit_dpwee_patch16_reg1_gap_256", {"qkv": ["in_proj"], "proj": ["out_proj"]}),
    ],
)
def test_roles_in_every_family(name: str, roles: dict[str, list[str]]) -> None:
    """Each family's block layout, parallel blocks included: `in_proj` (q, k, v and the MLP's
    first layer fused) plays the qkv role."""
    model = timm.create_model(name, pretrained=False, img_size=32, depth=2, num_classes=10)
    for role, suffixes in roles.items():
        found = [t.name for t in find_targets(model, [role])]
        assert found == [f"blocks.{i}.{s}" for i in range(2) for s in suffixes], role


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
        ("resnet18", "resnet18 is not supported.*not a plain ViT"),
        ("swin_tiny_patch4_window7_224", "hierarchical ViT .* out of scope.*eva, beit"),
        ("levit_128", "hierarchical ViT .* out of scope"),
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


# --checkpoint FILE: safetensors and weights_only torch files, adapted to the model as timm
# adapts pretrained weights (head, position and patch embeddings), everything else refused.

TINY = "vit_tiny_patch16_224"


def _source() -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    spec = ModelSpec(TINY, SMALL)
    return spec, create_model(spec).state_dict()


def _save(state: dict[str, torch.Tensor], path: Path, wrap: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif wrap:  # a training checkpoint: DDP prefixes, other entries beside the weights
        wrapped = {f"module.{k}": v for k, v in state.items()}
        torch.save({wrap: wrapped, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("name", "wrap"),
    [
        ("w.safetensors", None),
        ("w.pth", None),
        ("w.pth", "model"),
        ("w.pt", "state_dict"),
        ("w.bin", None),
        ("w.bin", "model_ema"),
    ],
)
def test_weights_files_load_exactly(tmp_path: Path, name: str, wrap: str | None) -> None:
    spec, state = _source()
    notes: list[str] = []
    loaded = create_model(spec, checkpoint=_save(state, tmp_path / name, wrap), note=notes.append)
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert notes == []


def test_another_number_of_classes_gets_a_fresh_head(tmp_path: Path) -> None:
    spec, state = _source()
    path = _save(state, tmp_path / "w.pth", "model")
    other = ModelSpec(TINY, {**SMALL, "num_classes": 5})
    torch.manual_seed(2)
    fresh = create_model(other).state_dict()
    torch.manual_seed(2)
    notes: list[str] = []
    loaded = create_model(other, checkpoint=path, note=notes.append).state_dict()
    assert loaded["head.weight"].shape == (5, 192)
    for key in ("head.weight", "head.bias"):
        assert torch.equal(loaded[key], fresh[key])  # timm's initialisation, not the file's
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("head."))
    assert notes == [
        "w.pth: the file's head has 10 classes, the model 5: head.weight, head.bias start fresh "
        "(timm's initialisation)."
    ]


def test_another_image_or_patch_size_resamples_the_embeddings(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    spec, state = _source()
    path = _save(state, tmp_path / "w.safetensors")
    notes: list[str] = []
    bigger = create_model(
        ModelSpec(TINY, {**SMALL, "img_size": 48}), checkpoint=path, note=notes.append
    )
    expected = resample_abs_pos_embed(
        state["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1
    )
    assert bigger.pos_embed.shape == (1, 37, 192) == expected.shape
    assert torch.equal(bigger.pos_embed.detach(), expected)
    assert all(torch.equal(bigger.state_dict()[k], v) for k, v in state.items() if k != "pos_embed")
    assert torch.isfinite(bigger.eval()(torch.randn(2, 3, 48, 48))).all()
    assert notes == [
        "w.safetensors: position embeddings resampled from 17 to 37 tokens for a 6x6 grid of "
        "patches (another image or patch size than the file's)."
    ]
    notes.clear()
    finer = create_model(
        ModelSpec(TINY, {**SMALL, "patch_size": 4}), checkpoint=path, note=notes.append
    )
    weight = finer.patch_embed.proj.weight.detach()
    assert torch.equal(weight, resample_patch_embed(state["patch_embed.proj.weight"], [4, 4]))
    assert finer.pos_embed.shape == (1, 65, 192)
    assert torch.isfinite(finer.eval()(torch.randn(2, 3, 32, 32))).all()
    assert "patch embedding resampled from 8 to 4 px patches" in " ".join(notes)


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    spec, _ = _source()
    full = tmp_path / "model.pth"
    torch.save(timm.create_model(TINY, **SMALL), full)
    with pytest.raises(SparsekitError) as info:
        create_model(spec, checkpoint=full)
    message = str(info.value)
    assert f"{full}: refused: it pickles Python objects" in message
    assert "VisionTransformer" in message and "weights_only=True" in message
    assert "torch.save(model.state_dict()" in message
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": _Opens(str(marker))}, hostile)
    with pytest.raises(SparsekitError, match="refused: it pickles Python objects"):
        create_model(spec, checkpoint=hostile)
    assert not marker.exists()


class _Opens:
    """Unpickling it would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_weights_that_do_not_fit_name_their_keys(tmp_path: Path) -> None:
    spec, state = _source()
    cut = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    cut["extra.weight"] = torch.zeros(3)
    with pytest.raises(SparsekitError) as info:
        create_model(spec, checkpoint=_save(cut, tmp_path / "cut.bin"))
    message = str(info.value)
    assert "weights do not fit VisionTransformer (missing: blocks.1.attn.proj.bias," in message
    assert "and 9 more; unexpected: extra.weight)" in message
    assert "--model-arg" in message
    wide = ModelSpec(TINY, {**SMALL, "embed_dim": 96, "num_heads": 3})
    with pytest.raises(SparsekitError, match=r"shape: .*\(file 192x192, model 96x96\)"):
        create_model(wide, checkpoint=_save(state, tmp_path / "w.safetensors"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("w.pth", b"garbage", "not a readable PyTorch weights file (Unsupported operand"),
        ("w.pt", None, "not a readable PyTorch weights file ("),
        ("w.bin", b"", "not a readable PyTorch weights file (it ends before any data)"),
        ("w.safetensors", b"garbage", "not a readable safetensors file"),
        ("w.npz", b"", "ending in .safetensors, .pth, .pt, .bin, not '.npz'"),
        ("w", b"", "not 'a name without a suffix'"),
        ("gone.pth", "missing", "no such checkpoint file"),
        ("epoch.pth", {"epoch": 3, "model": [1, 2]}, "holds no state dict (entries that are not"),
    ],
)
def test_unreadable_weights_files_are_clear_errors(
    tmp_path: Path, name: str, content, message: str
) -> None:
    spec, state = _source()
    path = tmp_path / name
    if content is None:  # a truncated torch.save file
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif isinstance(content, dict):
        torch.save(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(SparsekitError) as info:
        create_model(spec, checkpoint=path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_a_weights_file_never_downloads(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for module, name in [
        (builder, "load_pretrained"),
        (builder, "load_state_dict_from_url"),
        (builder, "load_state_dict_from_hf"),
        (huggingface_hub, "hf_hub_download"),
    ]:
        monkeypatch.setattr(module, name, no_network)
    spec, state = _source()
    path = _save(state, tmp_path / "w.safetensors")
    create_model(ModelSpec(TINY, {**SMALL, "num_classes": 3}), checkpoint=path)
    with pytest.raises(UsageError, match="--pretrained and --checkpoint .* give one"):
        create_model(spec, pretrained=True, checkpoint=path)


def test_cli_apply_adapts_a_checkpoint_to_the_digits(tmp_path: Path) -> None:
    """3-channel 32 px, patch 8, 10 classes -> the digits' 1-channel 8 px images, patch 4."""
    import yaml
    from typer.testing import CliRunner

    from sparsekit.cli.main import app

    _, state = _source()
    weights = _save(state, tmp_path / "w.pth", "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "from-weights",
                "training": {"epochs": 1, "batch_size": 64, "schedule": {"warmup": 0}},
                "phases": [{"kind": "dense_warmup", "end": 1}],
            }
        )
    )
    args = ["apply", str(recipe), "--model", TINY, "--model-arg", "depth=2", "--data", "digits"]
    result = CliRunner().invoke(
        app, [*args, "--checkpoint", str(weights), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app, [*args, "--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "no such checkpoint file" in result.output


def test_arguments_timm_builds_but_cannot_run_are_refused_before_training() -> None:
    """BEiT does not check that num_heads divides embed_dim: its forward fails, and sparsekit
    finds out on the meta device, before any weight is allocated."""
    spec = ModelSpec("beit_base_patch16_224", {**SMALL, "embed_dim": 64})
    with pytest.raises(SparsekitError, match="builds beit_base_patch16_224 .* cannot run it"):
        check_spec(spec)


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("vit_tiny_patch16_224", "timm.models.vision_transformer"),
        ("deit_tiny_patch16_224", "timm.models.vision_transformer"),
        ("vit_small_r26_s32_224", "timm.models.vision_transformer_hybrid"),
        ("eva02_tiny_patch14_224", "timm.models.eva"),
        ("beit_base_patch16_224", "timm.models.beit"),
        ("vit_relpos_small_patch16_224", "timm.models.vision_transformer_relpos"),
        ("naflexvit_base_patch16_gap", "timm.models.naflexvit"),
    ],
)
def test_checkpoints_go_through_their_familys_own_filter(name: str, module: str) -> None:
    """--checkpoint adapts weights as timm's builder of the model does: each family converts
    its own foreign layouts and resamples its own position tables."""
    from sparsekit.models import _checkpoint_filter

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, depth=1)
    filter_fn, _ = _checkpoint_filter(model)
    assert filter_fn.__module__ == module


def test_an_eva_checkpoint_of_another_image_size_is_resampled_by_evas_filter(tmp_path) -> None:
    from safetensors.torch import save_file

    from sparsekit.models import load_weights

    small = create_model(ModelSpec("eva02_tiny_patch14_224", {"img_size": 28, "depth": 1}))
    save_file(small.state_dict(), tmp_path / "w.safetensors")
    bigger = create_model(ModelSpec("eva02_tiny_patch14_224", {"img_size": 56, "depth": 1}))
    notes = load_weights(bigger, tmp_path / "w.safetensors")
    assert any("position embeddings resampled from 5 to 17 tokens" in n for n in notes)
    assert torch.isfinite(bigger.eval()(torch.randn(1, 3, 56, 56))).all()
