"""`sparsekit apply RECIPE --init-from EXPORT`: a run started from a sparsekit export (compacted
or masked) computes what the export computes, its phases start from the export's masks, heads,
neurons and token scorers, a fine-tune under `fixed_sparsity` exports exactly the export's
heads, neurons, zeros and selectors, exports and recipes that do not fit are refused in one
paragraph, and --resume reproduces an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import randomly_gated, tiny_vit
from rich.console import Console
from safetensors import safe_open
from typer.testing import CliRunner

from sparsekit import Session, Timeline, compile_recipe, load_recipe
from sparsekit.cli.main import app
from sparsekit.errors import SparsekitError
from sparsekit.export import export_model, export_run, load_compact, read_export
from sparsekit.init_from import read_start, start_phases
from sparsekit.models import ModelSpec, create_model
from sparsekit.run_folder.checkpoint import load_checkpoint
from sparsekit.surgery.tokens import selection_of
from sparsekit.train.trainer import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "recipes" / "finetune_export.yaml"
runner = CliRunner()
# A ViT cut to 2 blocks of 4 heads (width 64, MLP 256), on the digits at 8 px in 4 px patches.
MODEL_ARGS = {"depth": 2, "embed_dim": 64, "num_heads": 4}
HEADS, NEURONS, KEEP = 2, 96, 0.75
STEPS = "4 steps"


def source_recipe() -> dict:
    """SViTE+ and S2ViTE at once: unstructured DST, heads and neurons, a token selector."""
    cadence = {"update_every": STEPS, "min_update_interval": "1 steps"}
    return {
        "name": "source",
        "training": {"epochs": 1, "batch_size": 64, "drop_path": 0.0, "schedule": {"warmup": 0}},
        "phases": [
            {"kind": "unstructured_dst", "sparsity": 0.5, **cadence},
            {"kind": "head_prune_grow", "heads": HEADS, "mlp_neurons": NEURONS, **cadence},
            {"kind": "token_select", "keep_ratio": KEEP},
        ],
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """One real run of the trainer, exported compacted and masked."""
    root = tmp_path_factory.mktemp("init_from")
    config = RunConfig(
        model="vit_tiny_patch16_224", data="digits", output=root / "run", extra=MODEL_ARGS
    )
    train(load_recipe(source_recipe()), config, Console(quiet=True))
    export_run(root / "run", root / "compact", compact=True)
    export_run(root / "run", root / "masked", compact=False)
    return {"run": root / "run", "compact": root / "compact", "masked": root / "masked"}


def started(export: Path, recipe: dict, **spec_args) -> tuple[Session, torch.nn.Module, list]:
    """A session of `recipe` on the export's model started from the export, past its first
    batch (the phases' first masks made), as a run makes it."""
    start = read_start(export)
    spec = ModelSpec(start.spec.name, {**start.spec.kwargs, **spec_args})
    torch.manual_seed(0)
    model = create_model(spec)
    timeline = Timeline(1, 10)
    modifiers = compile_recipe(load_recipe(recipe), model, timeline)
    notes: list[str] = []
    start_phases(modifiers, model, start, notes.append)
    session = Session(model, None, modifiers, timeline)
    session.batch_start()
    return session, model, notes


def pruned_recipe() -> dict:
    """The other kinds that start from an export: one-shot magnitude pruning at the export's
    sparsity, and heads and neurons under a global budget of the export's totals."""
    recipe = source_recipe()
    recipe["phases"][0] = {"kind": "magnitude_prune", "sparsity": 0.5}
    recipe["phases"][1] = {**recipe["phases"][1], "budget": "global"}
    return recipe


RECIPES = {"fixed": lambda: fixed_recipe(), "source": source_recipe, "pruned": pruned_recipe}


def fixed_recipe(**phase) -> dict:
    return {
        "name": "ft",
        "training": {"epochs": 1, "batch_size": 64, "schedule": {"warmup": 0}},
        "phases": [{"kind": "fixed_sparsity", **phase}],
    }


def digits(count: int = 32) -> torch.Tensor:
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("form", ["compact", "masked"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_starting_model_computes_what_the_export_computes(exports, form, recipe) -> None:
    """Under the fixed form, under the recipe the export was trained with and under the other
    kinds (each phase starting from the export's masks, units and scorers), the model at the
    first step is the export's."""
    session, model, notes = started(exports[form], RECIPES[recipe]())
    exported = load_compact(exports[form])
    model.eval()
    if selection_of(model) is not None:
        selection_of(model).enabled = True
    with torch.no_grad():
        torch.testing.assert_close(model(digits()), exported(digits()), rtol=1e-5, atol=1e-5)
    kept = session.unit_masks()
    assert [int(kept[f"blocks.{i}.attn"].sum()) for i in range(2)] == [HEADS, HEADS]
    assert [int(kept[f"blocks.{i}.mlp"].sum()) for i in range(2)] == [NEURONS, NEURONS]
    assert [(p.before_block, p.keep_ratio) for p in session.token_placements()] == [(0, KEEP)]
    assert notes and "starting from" in notes[-1] and f"{2 * HEADS} of 8 heads" in notes[-1]
    # Exactly the export's zeros are masked, its non-zero weights kept.
    weights = read_start(exports[form]).state.weights
    for name, mask in session.masks().items():
        nonzero = weights[name].ne(0)
        assert torch.equal(mask & nonzero, nonzero), name
        if recipe == "fixed":
            assert torch.equal(mask, nonzero), name


def test_compact_and_masked_exports_start_alike(exports) -> None:
    compact, masked = read_start(exports["compact"]), read_start(exports["masked"])
    assert compact.compact and not masked.compact
    assert compact.sha256 != masked.sha256
    assert compact.spec == masked.spec
    for name, keep in compact.state.unit_keeps.items():
        assert int(keep.sum()) == int(masked.state.unit_keeps[name].sum()), name
        assert torch.equal(keep[: int(keep.sum())], torch.ones(int(keep.sum()), dtype=torch.bool))
    assert compact.state.weights.keys() == masked.state.weights.keys()
    for name, value in compact.state.weights.items():
        assert int(value.ne(0).sum()) == int(masked.state.weights[name].ne(0).sum()), name


def export_tensors(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    manifest, tensors = read_export(folder)
    return json.loads(manifest.model_dump_json()), tensors


@pytest.mark.parametrize("form", ["compact", "masked"])
def test_a_fine_tune_under_the_shipped_recipe_keeps_the_exports_sparsity(
    exports, form, tmp_path
) -> None:
    """recipes/finetune_export.yaml from either form, then `export --compact`: the same heads,
    neurons, zero positions and token selectors (scorers unchanged), new weights."""
    out = tmp_path / "ft"
    result = runner.invoke(
        app,
        ["apply", str(FINETUNE), "--init-from", str(exports[form]), "--data", "digits",
         "--epochs", "1", "--output", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "starting from" in result.output
    result = runner.invoke(app, ["export", str(out), "--compact", "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    before, old = export_tensors(exports["compact"])
    after, new = export_tensors(tmp_path / "x")
    assert after["blocks"] == before["blocks"]
    assert after["token_selection"] == before["token_selection"]
    assert after["model"] == before["model"]
    assert old.keys() == new.keys()
    changed = 0
    for name, value in old.items():
        assert new[name].shape == value.shape, name
        if name.startswith("token_selectors."):
            assert torch.equal(new[name], value), name  # frozen
        elif value.ndim >= 2:
            assert torch.equal(new[name].eq(0), value.eq(0)), name
        changed += not torch.equal(new[name], value)
    assert changed > len(old) // 2  # it trained
    # The trained model itself kept them (the export bakes the masks in; training must not need
    # it): every zero of the export's weights is still zero in the last checkpoint.
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    for name, value in read_start(exports[form]).state.weights.items():
        if value.ndim >= 2:
            assert torch.equal(trained[name].eq(0) & value.eq(0), value.eq(0)), name
    record = json.loads((out / "run.json").read_text())["init_from"]
    assert record["sha256"] == read_start(exports[form]).sha256
    assert Path(record["path"]) == exports[form].resolve()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output, result.output
    return result.exit_code, text


def write_recipe(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def refused(tmp_path: Path, recipe: dict, export: Path, *more: str) -> str:
    code, text = cli(
        "apply", write_recipe(tmp_path, recipe), "--init-from", str(export), "--data", "digits",
        "--output", str(tmp_path / "out"), *more,
    )  # fmt: skip
    assert code == 1, text
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    return text


def with_phase(index: int, **changes) -> dict:
    recipe = source_recipe()
    recipe["phases"][index] = {**recipe["phases"][index], **changes}
    return recipe


def test_a_recipe_that_does_not_fit_the_export_is_refused(exports, tmp_path) -> None:
    text = refused(tmp_path, with_phase(1, heads=3), exports["compact"])
    assert "phases[1] (head_prune_grow) does not fit the export" in text
    assert f"keeps {HEADS} of 4 heads in blocks.0.attn" in text and f"heads: {HEADS}" in text

    text = refused(tmp_path, with_phase(1, mlp_neurons=64), exports["masked"])
    assert f"keeps {NEURONS} of 256 MLP neurons" in text and f"mlp_neurons: {NEURONS}" in text

    text = refused(tmp_path, with_phase(0, sparsity=0.8), exports["compact"])
    assert "phases[0] (unstructured_dst) does not fit" in text
    assert "sparsity 0.8 (erk)" in text and "non-zero" in text and "fixed_sparsity" in text

    text = refused(tmp_path, with_phase(2, keep_ratio=0.5), exports["compact"])
    assert "phases[2] (token_select)" in text and "keep 0.75 before block 0" in text

    # Nothing holds the heads, neurons and token selectors of the export.
    recipe = source_recipe()
    recipe["phases"] = recipe["phases"][:1]
    text = refused(tmp_path, recipe, exports["compact"])
    assert "no phase of the recipe holds" in text
    assert "token selectors (keep 0.75 before block 0)" in text and "heads or neurons" in text

    # fixed_sparsity and token_select would both take the selectors.
    recipe = fixed_recipe()
    recipe["phases"].append({"kind": "token_select", "keep_ratio": KEEP})
    text = refused(tmp_path, recipe, exports["compact"])
    assert "set tokens: false" in text


def test_token_select_needs_an_export_with_scorers(tmp_path) -> None:
    spec = ModelSpec("vit_tiny_patch16_224", {**MODEL_ARGS, "img_size": 8, "patch_size": 4,
                                              "in_chans": 1, "num_classes": 10})  # fmt: skip
    model = create_model(spec)
    export_model(spec, model.state_dict(), tmp_path / "dense", recipe_yaml="name: d\n")
    recipe = fixed_recipe()
    recipe["phases"].append({"kind": "token_select", "keep_ratio": 0.5})
    text = refused(tmp_path, recipe, tmp_path / "dense")
    assert "phases[1] (token_select) does not fit" in text and "no token selectors" in text
    # The dense export fits the fixed form alone: nothing to hold, the run trains.
    session, _, _ = started(tmp_path / "dense", fixed_recipe())
    assert all(m.all() for m in session.masks().values())
    assert all(k.all() for k in session.unit_masks().values())


def test_options_that_contradict_the_export_are_usage_errors(exports, tmp_path) -> None:
    recipe = write_recipe(tmp_path, fixed_recipe())
    base = ["apply", recipe, "--init-from", str(exports["compact"]), "--data", "digits"]
    for extra, words in (
        (["--model", "deit_small"], "the export"),
        (["--img-size", "16"], "trained with 8"),
        (["--patch-size", "2"], "trained with 4"),
        (["--pretrained"], "both choose the starting weights"),
        (["--checkpoint", str(tmp_path / "w.safetensors")], "both choose the starting weights"),
        (["--model-arg", "depth=3"], "model-arg"),
    ):
        code, text = cli(*base, "--output", str(tmp_path / "o"), *extra)
        assert code in (1, 2) and words in text, (extra, text)
        assert code == (1 if extra[0] == "--model-arg" else 2), (extra, text)
    code, text = cli("apply", recipe, "--data", "digits", "--output", str(tmp_path / "o"))
    assert code == 2 and "give --model NAME" in text


def test_a_damaged_or_edited_export_is_refused(exports, tmp_path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(exports["compact"], damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor
    (damaged / "model.safetensors").write_bytes(bytes(data))
    text = refused(tmp_path, fixed_recipe(), damaged)
    assert "modified or damaged after export" in text
    edited = tmp_path / "edited"
    shutil.copytree(exports["compact"], edited)
    with safe_open(edited / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from safetensors.torch import save_file

    meta["sparsekit"] = meta["sparsekit"].replace('"heads": 2', '"heads": 3', 1)
    save_file(tensors, edited / "model.safetensors", metadata=meta)
    text = refused(tmp_path, fixed_recipe(), edited)
    assert "modified or damaged after export" in text
    text = refused(tmp_path, fixed_recipe(), tmp_path / "nowhere")
    assert "does not exist" in text


def test_another_number_of_classes_gets_a_fresh_classifier(exports) -> None:
    torch.manual_seed(0)
    session, model, notes = started(exports["compact"], fixed_recipe(), num_classes=5)
    assert any("classifier (head.weight, head.bias) starts fresh" in n for n in notes)
    weights = read_start(exports["compact"]).state.weights
    assert model.head.weight.shape == (5, 64)
    assert bool(session.masks()["head.weight"].all())  # a fresh head is dense
    qkv = model.blocks[0].attn.qkv.weight
    assert torch.equal(qkv.detach(), weights["blocks.0.attn.qkv.weight"])


def test_images_of_other_channels_are_refused(exports) -> None:
    with pytest.raises(SparsekitError, match="1-channel images, but --data gives 3-channel"):
        started(exports["compact"], fixed_recipe(), in_chans=3)


def finetune(exports: Path, out: Path, **kwargs) -> dict:
    recipe = load_recipe(FINETUNE, ["training.epochs=2"])
    config = RunConfig(init_from=exports, data="digits", output=out, **kwargs)
    return train(recipe, config, Console(quiet=True))


def test_resume_reproduces_an_uninterrupted_fine_tune(exports, tmp_path) -> None:
    full = finetune(exports["compact"], tmp_path / "full")
    assert finetune(exports["compact"], tmp_path / "split", stop_after_epoch=1) == {
        "stopped_at_epoch": 1
    }
    with pytest.raises(SparsekitError, match="give --init-from .* again"):
        train(
            load_recipe(FINETUNE, ["training.epochs=2"]),
            RunConfig(model="vit_tiny_patch16_224", data="digits", output=tmp_path / "split",
                      extra=MODEL_ARGS, resume=True),
            Console(quiet=True),
        )  # fmt: skip
    with pytest.raises(SparsekitError, match="its hash differs"):
        finetune(exports["masked"], tmp_path / "split", resume=True)
    plain = RunConfig(model="vit_tiny_patch16_224", data="digits", output=tmp_path / "plain",
                      extra=MODEL_ARGS, stop_after_epoch=1)  # fmt: skip
    train(load_recipe(FINETUNE, ["training.epochs=2"]), plain, Console(quiet=True))
    with pytest.raises(SparsekitError, match="not started from an export"):
        finetune(exports["compact"], tmp_path / "plain", resume=True)
    resumed = finetune(exports["compact"], tmp_path / "split", resume=True)
    assert resumed["val_acc"] == full["val_acc"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    state_a, state_b = a["session"]["modifiers"][0]["state"], b["session"]["modifiers"][0]["state"]
    for key in ("masks", "keeps"):
        for name, mask in state_a[key].items():
            assert torch.equal(mask, state_b[key][name]), (key, name)


def test_fixed_sparsity_without_an_export_holds_the_models_own_zeros() -> None:
    """No --init-from: the masks are the model's zeros at `start`, a head whose weights are all
    zero is gated off, and training keeps both."""
    torch.manual_seed(0)
    model = tiny_vit(global_pool="avg")
    with torch.no_grad():
        qkv, proj = model.blocks[0].attn.qkv, model.blocks[0].attn.proj
        width = model.blocks[0].attn.head_dim
        heads = model.blocks[0].attn.num_heads
        for chunk in range(3):  # head 1: its q, k and v rows, biases, proj columns
            rows = slice(chunk * heads * width + width, chunk * heads * width + 2 * width)
            qkv.weight[rows] = 0
            qkv.bias[rows] = 0
        proj.weight[:, width : 2 * width] = 0
        model.blocks[1].mlp.fc1.weight[:, :5] = 0  # loose zeros
    zeros = {n: p.detach().eq(0) for n, p in model.named_parameters() if p.ndim >= 2}
    timeline = Timeline(1, 6)
    modifiers = compile_recipe(load_recipe(fixed_recipe()), model, timeline)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    session = Session(model, optimizer, modifiers, timeline)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(8, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        session.batch_start()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        session.after_optimizer_step()
    keep = session.unit_masks()["blocks.0.attn"]
    assert keep.tolist() == [i != 1 for i in range(heads)]
    for name, zero in zeros.items():
        if name in session.masks():
            assert torch.equal(model.get_parameter(name).detach().eq(0) & zero, zero), name
    fc1 = session.masks()["blocks.1.mlp.fc1.weight"]
    assert int(fc1.logical_not().sum()) == 5 * fc1.shape[0]
    session.close()


@pytest.mark.parametrize(
    "name",
    ["vit_dpwee_patch16_reg1_gap_256", "vit_base_patch16_xp_224", "vit_small_patch16_18x2_224"],
)
def test_parallel_blocks_start_from_their_compacted_export(name: str, tmp_path) -> None:
    """A compacted export of parallel blocks (heads and neurons sharing one in_proj and out
    projection; or two attentions and two MLPs per block) expands back to full size with
    the units it kept: the starting model computes what the export computes."""
    size = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}
    spec = ModelSpec(name, {**size, "num_classes": 10})

    def keep_of(group_name: str, group) -> torch.Tensor:
        keep = torch.rand(group.units, generator=torch.Generator().manual_seed(group.units)) < 0.5
        keep[0] = True
        return keep

    model, keeps = randomly_gated(spec, keep_of)
    export_model(spec, model.state_dict(), tmp_path / "export", unit_masks=keeps)
    session, started_model, _ = started(tmp_path / "export", fixed_recipe())
    started_model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(started_model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            load_compact(tmp_path / "export")(x), expected, rtol=1e-5, atol=1e-5
        )
    kept = session.unit_masks()
    assert sorted(kept) == sorted(keeps)
    assert all(int(kept[n].sum()) == int(keeps[n].sum()) for n in keeps)
