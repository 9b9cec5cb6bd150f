"""Export and load: compacted == masked, on real runs and across the timm ViT family; corrupt,
tampered (tensors or manifest) and foreign files refused, and manifests held to the model
bounds even with a recomputed hash; interrupted exports leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import randomly_gated, train_step
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import sparsekit.export.writer as writer
from sparsekit import Session, load_recipe
from sparsekit.analysis.cost import model_cost, params_removed
from sparsekit.cli.main import app
from sparsekit.compiler import compile_recipe
from sparsekit.errors import SparsekitError
from sparsekit.export import export_model, export_run, load_compact, read_export
from sparsekit.export.manifest import FORMAT_VERSION, Manifest, export_sha256
from sparsekit.hashing import tensors_sha256
from sparsekit.models import ModelSpec, create_model
from sparsekit.recipe import dump_recipe
from sparsekit.run_folder.trained_run import open_run
from sparsekit.surgery.compact import unit_groups
from sparsekit.surgery.tokens import Placement, TokenSelection
from sparsekit.timeline import Timeline
from sparsekit.train.trainer import RunConfig, train

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def combined_recipe(epochs: int = 2) -> dict:
    """SViTE + S2ViTE in one recipe: unstructured DST and head/neuron prune-grow."""
    return {
        "name": "combined",
        "training": {"epochs": epochs, "batch_size": 32, "schedule": {"warmup": 0}},
        "phases": [
            {
                "kind": "unstructured_dst",
                "sparsity": 0.5,
                "update_every": "2 steps",
                "min_update_interval": "1 steps",
            },
            {
                "kind": "head_prune_grow",
                "head_density": 0.5,
                "mlp_density": 0.5,
                "update_every": "2 steps",
                "min_update_interval": "1 steps",
            },
        ],
    }


def train_steps(spec: ModelSpec, recipe: dict, steps: int):
    """A few real training steps of `spec` under `recipe`; returns the gated model and session."""
    torch.manual_seed(0)
    model = create_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    session = Session.from_recipe(load_recipe(recipe), model, optimizer, steps_per_epoch=steps)
    size, chans = spec.kwargs.get("img_size", 32), spec.kwargs.get("in_chans", 3)
    for _ in range(steps):
        x, y = torch.randn(4, chans, size, size), torch.randint(0, 10, (4,))
        train_step(session, model, optimizer, x, y)
    return model.eval(), session


def export_session(model, session, spec, out: Path, compact: bool = True):
    """Export what `session` trained through the public API."""
    return export_model(
        spec,
        model.state_dict(),
        out,
        session.masks(),
        session.unit_masks(),
        session.token_placements(),
        "name: x\n",
        compact=compact,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run of the built-in trainer on the digits data, DST + heads + neurons."""
    out = tmp_path_factory.mktemp("runs") / "combined"
    config = RunConfig(model="deit_tiny", data="digits", output=out)
    train(load_recipe(combined_recipe()), config, Console(quiet=True))
    return out


def gated_model(run_dir: Path) -> torch.nn.Module:
    """The masked model exactly as it trained: gates on, unstructured masks in the weights."""
    run = open_run(run_dir)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    model = create_model(run.spec)
    model.load_state_dict(run.weights)
    timeline = Timeline(run.recipe.training.epochs, ckpt["steps_per_epoch"])
    session = Session(model, None, compile_recipe(run.recipe, model, timeline), timeline)
    session.load_state_dict(ckpt["session"])
    return model.eval()


def test_compact_export_of_a_real_run_equals_the_masked_model(run_dir: Path, tmp_path) -> None:
    run = open_run(run_dir)
    masked = gated_model(run_dir)
    manifest = export_run(run_dir, tmp_path / "compact", compact=True)
    compact = load_compact(tmp_path / "compact")
    export_run(run_dir, tmp_path / "masked", compact=False)
    full = load_compact(tmp_path / "masked")
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        expected = masked(x)
        assert torch.allclose(compact(x), expected, atol=1e-4)
        assert torch.allclose(full(x), expected, atol=1e-4)
    # Heads really removed, and exactly the parameters the unit layout says.
    assert [b.heads for b in manifest.blocks] == [
        int(run.unit_masks[f"blocks.{i}.attn"].sum()) for i in range(len(manifest.blocks))
    ]
    dense = create_model(run.spec)
    removed = params_removed(unit_groups(dense), run.unit_masks)
    assert model_cost(compact).params == model_cost(dense).params - removed
    assert model_cost(full).params == model_cost(dense).params
    # Unstructured masks are baked in: the compact model keeps only kept weights non-zero.
    assert model_cost(compact).nonzero_params < model_cost(full).params


def test_export_folder_holds_manifest_recipe_and_tensors(run_dir: Path, tmp_path) -> None:
    manifest = export_run(run_dir, tmp_path / "e")
    files = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert files == ["config.json", "model.safetensors", "recipe.yaml"]
    config = json.loads((tmp_path / "e" / "config.json").read_text())["sparsekit"]
    assert config["model"] == "deit_tiny_patch16_224" and config["compact"] is True
    assert config["blocks"][0]["heads"] == manifest.blocks[0].heads
    assert (tmp_path / "e" / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()
    assert config["recipe_sha256"]


# A sample of the VisionTransformer family: class token or not, distillation and register
# tokens, qkv bias on and off, qk-norm, layer scale, pre-norm, SwiGLU and pooled heads.
FAMILY = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("vit_base_patch32_224", {}),
    ("deit_tiny_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("deit3_small_patch16_224", {}),
    ("vit_medium_patch16_gap_256", {}),
    ("vit_base_patch16_reg4_gap_256", {}),
    ("vit_small_patch14_reg4_dinov2", {}),
    ("vit_base_patch16_clip_224", {}),
    ("vit_tiny_patch16_224", {"qkv_bias": False}),
    ("vit_tiny_patch16_224", {"qk_norm": True}),
    ("vit_base_patch16_siglip_224", {}),
    ("vit_little_patch16_reg4_gap_256", {}),
]


@pytest.mark.parametrize(("name", "extra"), FAMILY, ids=[f"{n}{e or ''}" for n, e in FAMILY])
def test_phase_export_load_is_exact_across_the_family(name: str, extra: dict, tmp_path) -> None:
    spec = ModelSpec(name, {**SMALL, **extra})
    model, session = train_steps(spec, combined_recipe(), 5)
    export_session(model, session, spec, tmp_path / "out")
    loaded = load_compact(tmp_path / "out")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-4)
    heads = [b.attn.num_heads for b in loaded.blocks]
    assert heads == [int(m.sum()) for k, m in session.unit_masks().items() if k.endswith("attn")]


def test_unstructured_only_export_bakes_the_masks(tmp_path) -> None:
    spec = ModelSpec("deit_tiny_patch16_224", SMALL)
    recipe = combined_recipe()
    recipe["phases"] = recipe["phases"][:1]  # unstructured_dst alone: nothing to slice
    model, session = train_steps(spec, recipe, 3)
    manifest = export_session(model, session, spec, tmp_path / "dst")
    loaded = load_compact(tmp_path / "dst")
    assert [b.heads for b in manifest.blocks] == [3, 3]
    for name, mask in session.masks().items():
        weight = loaded.get_parameter(name)
        assert torch.all(weight[~mask] == 0) and int(mask.sum()) < mask.numel()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def small_export(tmp_path: Path) -> Path:
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    model, session = train_steps(spec, combined_recipe(), 3)
    export_session(model, session, spec, tmp_path / "ok")
    return tmp_path / "ok" / "model.safetensors"


def test_truncated_file_is_refused(tmp_path) -> None:
    file = small_export(tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparsekitError, match="truncated or corrupt"):
        load_compact(file)


def test_tampered_tensor_is_detected(tmp_path) -> None:
    file = small_export(tmp_path)
    data = bytearray(file.read_bytes())
    data[-9] ^= 0xFF  # one byte of the last tensor's data
    file.write_bytes(bytes(data))
    with pytest.raises(SparsekitError, match="modified or damaged"):
        load_compact(file)


def test_foreign_and_future_files_are_refused(tmp_path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(SparsekitError, match="no sparsekit manifest"):
        load_compact(foreign)
    manifest, tensors = read_export(small_export(tmp_path))
    future = manifest.model_copy(update={"format_version": 99})
    save_file(tensors, tmp_path / "future.safetensors", {"sparsekit": future.model_dump_json()})
    with pytest.raises(SparsekitError, match="format 99"):
        load_compact(tmp_path / "future.safetensors")
    with pytest.raises(SparsekitError, match="does not exist"):
        load_compact(tmp_path / "nothing")


def test_interrupted_export_leaves_the_previous_one_whole(tmp_path, monkeypatch) -> None:
    file = small_export(tmp_path)
    before = file.read_bytes()

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "save_file", crash)
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    model, session = train_steps(spec, combined_recipe(), 2)
    with pytest.raises(KeyboardInterrupt):
        export_session(model, session, spec, tmp_path / "ok")
    assert file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no temporary folder left
    load_compact(file)


def test_export_refuses_a_folder_of_other_files(tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    model, session = train_steps(spec, combined_recipe(), 2)
    with pytest.raises(SparsekitError, match="not an earlier sparsekit export"):
        export_session(model, session, spec, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_cli_export_and_inspect(run_dir: Path, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["export", str(run_dir), "--compact", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (out / "model.safetensors").exists()
    for target in (run_dir, out):
        result = runner.invoke(app, ["inspect", str(target)])
        assert result.exit_code == 0, result.output
        assert "heads" in result.output and "x)" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "neither a run folder" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 1 and "not a finished sparsekit run folder" in result.output


def test_recipe_round_trips_into_the_export(run_dir: Path) -> None:
    run = open_run(run_dir)
    assert run.recipe_yaml == dump_recipe(run.recipe)


# The manifest is under the hash, and what it may ask timm to build is bounded.


def tiny_export(tmp_path: Path) -> Path:
    """An untrained export with a token selector: enough for tests of the file itself."""
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    placements = [Placement(1, 0.5)]
    torch.manual_seed(0)
    model = create_model(spec)
    TokenSelection(model, placements)
    export_model(spec, model.state_dict(), tmp_path / "tiny", placements=placements)
    return tmp_path / "tiny" / "model.safetensors"


def rewrite(file: Path, edit, rehash: bool = False, indent: int | None = None) -> Path:
    """`file` saved again with the same tensors and its manifest edited by `edit(record)`;
    with `rehash`, its sha256 recomputed, as someone who knows the format could."""
    manifest, tensors = read_export(file)
    record = manifest.model_dump(mode="json")
    edit(record)
    if rehash:
        record["sha256"] = export_sha256(Manifest.model_validate(record), tensors)
    out = file.parent / "edited.safetensors"
    stored = load_file(file)  # as written: compressed tensors stay compressed
    save_file(stored, out, {"sparsekit": json.dumps(record, indent=indent)})
    return out


def _set(*path_and_value):
    *path, key, value = path_and_value

    def edit(record: dict) -> None:
        for part in path:
            record = record[part]
        record[key] = value

    return edit


METADATA_EDITS = {
    "act_layer": _set("model_kwargs", "act_layer", "relu"),
    "keep_ratio": _set("token_selection", 0, "keep_ratio", 0.25),
    "heads": _set("blocks", 0, "heads", 1),
    "model": _set("model", "deit_tiny_patch16_224"),
    "recipe": _set("recipe_sha256", "0" * 64),
}


@pytest.mark.parametrize("edit", list(METADATA_EDITS.values()), ids=list(METADATA_EDITS))
def test_editing_the_manifest_alone_is_detected(edit, tmp_path) -> None:
    edited = rewrite(tiny_export(tmp_path), edit)
    with pytest.raises(SparsekitError, match="manifest or tensors do not match the hash"):
        load_compact(edited)
    with pytest.raises(SparsekitError, match="modified or damaged after export"):
        read_export(edited)


def test_the_hash_ignores_layout_and_config_json(tmp_path) -> None:
    file = tiny_export(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_compact(file)(x)
        relaid = rewrite(file, lambda record: None, indent=4)  # same content, other whitespace
        assert torch.equal(load_compact(relaid)(x), expected)
        (file.parent / "config.json").write_text('{"model": "nope_model"}')  # for people only
        assert torch.equal(load_compact(file.parent)(x), expected)
    manifest, _ = read_export(file)
    assert manifest.format_version == FORMAT_VERSION == 3
    assert json.loads((file.parent / "recipe.yaml").read_text() or "null") is None


def test_format_1_export_is_refused_by_name(tmp_path) -> None:
    manifest, tensors = read_export(tiny_export(tmp_path))
    record = manifest.model_dump(mode="json")
    del record["sha256"]
    record.update(format_version=1, tensors_sha256=tensors_sha256(tensors))
    save_file(tensors, tmp_path / "old.safetensors", {"sparsekit": json.dumps(record)})
    with pytest.raises(
        SparsekitError, match="is export format 1; this sparsekit reads formats 2 and 3"
    ):
        load_compact(tmp_path / "old.safetensors")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pretrained", True),
        ("pretrained_cfg", "augreg_in21k"),
        ("checkpoint_path", "/etc/passwd"),
        ("cache_dir", "/tmp/cache"),
        ("device", "meta"),
        ("dtype", "float16"),
        ("features_only", True),
        ("pretrained_strict", False),
    ],
)
def test_a_rehashed_manifest_cannot_open_files_or_pick_devices(key, value, tmp_path) -> None:
    edited = rewrite(tiny_export(tmp_path), _set("model_kwargs", key, value), rehash=True)
    read_export(edited)  # the hash is right: the bounds refuse it, not the hash
    with pytest.raises(SparsekitError, match="not a model argument sparsekit passes to timm"):
        load_compact(edited)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("model_kwargs", "depth", 10**6), "depth=1000000 .* out of bounds"),
        (_set("model_kwargs", "embed_dim", 10**6), "embed_dim=1000000 .* out of bounds"),
        (_set("model_kwargs", "act_layer", "nope"), "act_layer='nope'"),
        (_set("model_kwargs", "act_layer", {"class": "os.system"}), "not a plain value"),
        (_set("model_kwargs", "img_size", 4), "patch_size 8 is larger than img_size 4"),
        (_set("model", "nope_model"), "unknown model 'nope_model'"),
        (_set("model", "resnet18"), "resnet18 is not supported"),
        (_set("model_kwargs", "depth", 3), "lists 2 blocks but .* has 3"),
    ],
    ids=["depth", "embed_dim", "act_layer", "object", "patch", "unknown", "resnet", "blocks"],
)
def test_a_rehashed_manifest_is_held_to_the_model_bounds(edit, message, tmp_path) -> None:
    edited = rewrite(tiny_export(tmp_path), edit, rehash=True)
    read_export(edited)
    with pytest.raises(SparsekitError, match=message) as info:
        load_compact(edited)
    assert str(edited) in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        _set("blocks", [{"heads": 3, "head_dim": 64, "mlp_hidden": 768}] * 300),
        _set("blocks", 0, "heads", 5000),
        _set("token_selection", 0, "before_block", 10**9),
    ],
    ids=["300 blocks", "5000 heads", "selector far away"],
)
def test_absurd_block_shapes_are_a_malformed_manifest(edit, tmp_path) -> None:
    with pytest.raises(SparsekitError, match="manifest is malformed"):
        load_compact(rewrite(tiny_export(tmp_path), edit))


# Parallel branches: the manifest says what each of a ParallelThingsBlock's branches keeps.


def branch_export(tmp_path: Path) -> tuple[Path, nn.Module, dict[str, torch.Tensor]]:
    """A compacted export of a ParallelThingsBlock ViT whose two branches keep different
    numbers of heads and neurons, with the masked model it came from."""
    spec = ModelSpec("vit_small_patch16_18x2_224", {**SMALL, "embed_dim": 96})

    def keep_of(name: str, group) -> torch.Tensor:
        branch = int(name.split(".")[3])  # blocks.N.attns.M.attn, blocks.N.ffns.M.mlp
        keep = torch.ones(group.units, dtype=torch.bool)
        keep[: 1 + branch if group.kind == "heads" else 100 + 20 * branch] = False
        return keep

    model, keeps = randomly_gated(spec, keep_of)
    export_model(spec, model.state_dict(), tmp_path / "branches", unit_masks=keeps)
    return tmp_path / "branches" / "model.safetensors", model, keeps


def test_parallel_branches_keep_their_own_units_through_export(tmp_path) -> None:
    file, masked, keeps = branch_export(tmp_path)
    manifest, _ = read_export(file)
    for i, block in enumerate(manifest.blocks):
        kept = [
            (
                int(keeps[f"blocks.{i}.attns.{j}.attn"].sum()),
                int(keeps[f"blocks.{i}.ffns.{j}.mlp"].sum()),
            )
            for j in range(2)
        ]
        assert [(b.heads, b.mlp_hidden) for b in block.branches] == kept
        assert (block.heads, block.mlp_hidden) == tuple(map(sum, zip(*kept, strict=True)))
    assert len({b.heads for block in manifest.blocks for b in block.branches}) > 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_compact(file)(x), masked(x), rtol=1e-5, atol=1e-5)


def _branches(edit):
    def change(record: dict) -> None:
        edit(record["blocks"][0])

    return change


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_branches(lambda b: b.update(branches=None)), "parallel branches of"),
        (_branches(lambda b: b["branches"].pop()), "parallel branches of"),
        (
            _branches(lambda b: b["branches"][0].update(heads=b["branches"][0]["heads"] + 1)),
            "block total",
        ),
        (_branches(lambda b: b["branches"][1].update(mlp_hidden=10**4)), "parallel branches of"),
    ],
    ids=["dropped", "one short", "not the total", "wider than the branch"],
)
def test_a_rehashed_manifest_with_wrong_branches_is_refused(edit, message, tmp_path) -> None:
    edited = rewrite(branch_export(tmp_path)[0], edit, rehash=True)
    with pytest.raises(SparsekitError, match=message) as info:
        load_compact(edited)
    assert str(edited) in str(info.value) and "inconsistent" in str(info.value)


def test_branches_on_a_plain_block_are_refused_and_old_manifests_keep_their_hash(tmp_path) -> None:
    file = tiny_export(tmp_path)
    edit = _branches(lambda b: b.update(branches=[{"heads": 1, "mlp_hidden": 1}]))
    with pytest.raises(SparsekitError, match="lists parallel branches"):
        load_compact(rewrite(file, edit, rehash=True))

    def written_before_branches(record: dict) -> None:  # no `branches` key at all
        for block in record["blocks"]:
            del block["branches"]

    load_compact(rewrite(file, written_before_branches))  # the hash still holds
