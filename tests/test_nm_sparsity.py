"""N:M sparsity: the recipe rules, masks exact at every step of real runs, the export's marks
(checked on the tensors), and the accelerate path as far as a CPU can take it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import dst_recipe, tiny_vit, train_step
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

from sparsekit import Session, load_recipe
from sparsekit.errors import RecipeError, SparsekitError
from sparsekit.export import export_model, export_run, load_compact, read_export
from sparsekit.export.accelerate import (
    accelerate_,
    nm_marks,
    parse_nm,
    semi_structured_plan,
)
from sparsekit.export.manifest import METADATA_KEY, Manifest, canonical_json
from sparsekit.models import ModelSpec, create_model
from sparsekit.modifiers.unstructured_dst import UnstructuredDST
from sparsekit.recipe import dump_recipe
from sparsekit.surgery.nm_masks import (
    holds_nm,
    nm_group_counts,
    nm_grow_mask,
    nm_topk_mask,
)
from sparsekit.timeline import Timeline
from sparsekit.train.trainer import RunConfig, train

ROOT = Path(__file__).parents[1]
SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


def nm_recipe(pattern: str = "2:4", **phase) -> dict:
    n, m = parse_nm(pattern)
    return dst_recipe(pattern=pattern, sparsity=1 - n / m, **phase)


def recipe_error(data: dict | str, tmp_path: Path | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        if isinstance(data, str):
            assert tmp_path is not None
            (tmp_path / "r.yaml").write_text(data, encoding="utf-8")
            load_recipe(tmp_path / "r.yaml")
        else:
            load_recipe(data)
    return str(info.value)


# --- the recipe ---------------------------------------------------------------------------
def test_a_pattern_fixes_sparsity_and_spreads_uniformly() -> None:
    phase = load_recipe(nm_recipe("2:4")).phases[0]
    assert phase.nm == (2, 4) and phase.distribution == "uniform"
    # The dumped recipe (every default filled in) reads back to the same phase.
    assert load_recipe(yaml.safe_load(dump_recipe(load_recipe(nm_recipe("3:8"))))).phases[0].nm == (
        3,
        8,
    )
    assert "pattern 2:4" in phase.describe(Timeline(4, 10))
    assert load_recipe(dst_recipe()).phases[0].nm is None


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ({"pattern": "2:4", "sparsity": 0.6}, "set sparsity: 0.5"),
        ({"pattern": "4:2", "sparsity": 0.5}, "0 < N < M <= 32"),
        ({"pattern": "0:4", "sparsity": 0.5}, "0 < N < M <= 32"),
        ({"pattern": "1:64", "sparsity": 1 - 1 / 64}, "0 < N < M <= 32"),
        ({"pattern": "2-4", "sparsity": 0.5}, 'write N:M, e.g. "2:4"'),
        ({"pattern": "2:4", "sparsity": 0.5, "distribution": "erk"}, "leave distribution out"),
        (
            {"pattern": "2:4", "sparsity": 0.5, "targets": {"roles": ["fc1", "patch_embed"]}},
            "drop patch_embed",
        ),
    ],
)
def test_bad_patterns_are_refused_at_the_field(phase: dict, message: str) -> None:
    recipe = dst_recipe()
    recipe["phases"][0] = {"kind": "unstructured_dst", **phase}
    text = recipe_error(recipe)
    assert "phases[0].pattern" in text and message in text, text


def test_an_unquoted_pattern_gets_the_yaml_advice_and_its_line(tmp_path: Path) -> None:
    text = recipe_error(
        "name: t\nphases:\n  - kind: unstructured_dst\n    sparsity: 0.5\n    pattern: 2:4\n",
        tmp_path,
    )
    assert "phases[0].pattern (line 5)" in text, text
    assert "base-60" in text and "2:4 became 124" in text and 'pattern: "2:4"' in text


def test_targets_whose_inputs_do_not_divide_into_groups_are_refused_when_compiled() -> None:
    model = tiny_vit()  # width 192, MLP 768: neither is a multiple of 5
    recipe = load_recipe(nm_recipe("1:5"))
    with pytest.raises(RecipeError) as info:
        Session.from_recipe(recipe, model, None, steps_per_epoch=4)
    text = str(info.value)
    assert "phases[0]" in text and "blocks.0.attn.qkv has 192 input features" in text, text
    assert "targets.exclude" in text


# --- the masks ----------------------------------------------------------------------------
def test_top_n_per_group_keeps_the_largest_and_breaks_ties_by_position() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    assert nm_topk_mask(scores, 2, 4).tolist() == [[1, 0, 1, 0, 1, 1, 0, 0]]
    scores = torch.rand(48, 64)
    mask = nm_topk_mask(scores, 3, 8)
    assert torch.all(nm_group_counts(mask, 8) == 3)
    groups, kept = scores.view(-1, 8), mask.view(-1, 8)
    # Every kept score of a group beats every dropped one.
    low = torch.where(kept, groups, torch.inf).amin(-1)
    high = torch.where(kept, -torch.inf, groups).amax(-1)
    assert torch.all(low >= high)


def test_growth_refills_each_group_to_exactly_n_from_its_free_positions() -> None:
    torch.manual_seed(0)
    kept = nm_topk_mask(torch.rand(16, 32), 2, 4)
    kept &= torch.rand(16, 32) > 0.4  # a prune took 0, 1 or 2 of each group
    score = torch.rand(16, 32)
    grown = nm_grow_mask(score, kept, 2, 4)
    assert not torch.any(grown & kept)
    assert torch.all(nm_group_counts(kept | grown, 4) == 2)
    # Within a group, each grown position outscores each free one left out.
    free_left = ~(kept | grown)
    s = score.view(-1, 4)
    low = torch.where(grown.view(-1, 4), s, torch.inf).amin(-1)
    high = torch.where(free_left.view(-1, 4), s, -torch.inf).amax(-1)
    assert torch.all(low >= high)
    with pytest.raises(ValueError):
        nm_grow_mask(score, torch.ones(16, 32, dtype=torch.bool), 2, 4)


def test_holds_nm_reads_the_tensor() -> None:
    w = torch.randn(8, 16) * nm_topk_mask(torch.rand(8, 16), 2, 4)
    assert holds_nm(w, 2, 4) and holds_nm(w, 2, 4, exact=True)
    assert holds_nm(w, 4, 8) and not holds_nm(w, 1, 4)
    w[0, :4] = 1.0
    assert not holds_nm(w, 2, 4)
    assert not holds_nm(torch.zeros(8, 10), 2, 4)  # 10 inputs: no whole groups


# --- real runs ----------------------------------------------------------------------------
def run_steps(recipe: dict, steps: int, optimizer_name: str, check) -> Session:
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        if optimizer_name == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    )
    session = Session.from_recipe(load_recipe(recipe), model, optimizer, steps_per_epoch=4)
    dst = session.modifiers[0]
    for _ in range(steps):
        train_step(session, model, optimizer, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        check(session, dst, optimizer)
    return session


@pytest.mark.parametrize(
    ("pattern", "grow", "optimizer_name"),
    [("2:4", "gradient", "adamw"), ("2:4", "random", "sgd"), ("1:4", "gradient", "sgd"),
     ("3:8", "gradient", "adamw")],
)  # fmt: skip
def test_every_group_holds_exactly_n_after_every_step(
    pattern: str, grow: str, optimizer_name: str
) -> None:
    n, m = parse_nm(pattern)
    recipe = nm_recipe(
        pattern, grow=grow, grow_accumulation=2, end="100%", update_fraction=0.3,
        fraction_decay="constant", targets={"roles": ["qkv", "proj", "fc1", "fc2", "head"]},
    )  # fmt: skip
    previous: dict[str, torch.Tensor] = {}
    changed = []

    def check(session, dst, optimizer):
        masks = dst.masks()
        for t in dst.targets:
            mask = masks[f"{t.name}.weight"]
            assert torch.all(nm_group_counts(mask, m) == n), (session.step, t.name)
            assert torch.all(t.weight[~mask] == 0)  # masked weights exactly 0
            assert holds_nm(t.weight, n, m)
            for value in optimizer.state[t.weight].values():
                if torch.is_tensor(value) and value.shape == t.weight.shape:
                    assert torch.all(value[~mask] == 0)  # no optimizer state where masked
            if t.name in previous and not torch.equal(previous[t.name], mask):
                changed.append((session.step, t.name))
            previous[t.name] = mask.clone()

    session = run_steps(recipe, 9, optimizer_name, check)
    dst = session.modifiers[0]
    assert isinstance(dst, UnstructuredDST) and dst.updates_done == 4  # every 2 steps in (0, 9)
    assert len({step for step, _ in changed}) == 4, "an update left every mask as it was"
    assert {name for _, name in changed} == {t.name for t in dst.targets}
    for t, budget in zip(dst.targets, dst.budgets, strict=True):
        assert budget == t.weight.numel() * n // m
    updates = [e for e in session.events if e["event"] == "mask_update"]
    # The update fraction is per layer, as unstructured: ceil(f x active) regrown in each.
    assert len(updates) == 4
    assert all(e["regrown"] == sum(math.ceil(0.3 * b) for b in dst.budgets) for e in updates)


def test_one_update_prunes_the_smallest_and_regrows_by_gradient_within_each_group() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay; only masks move
    recipe = nm_recipe(
        update_every="1 steps", end="100%", fraction_decay="constant", update_fraction=0.25,
        targets={"roles": ["fc1"]},
    )  # fmt: skip
    session = Session.from_recipe(load_recipe(recipe), model, optimizer, steps_per_epoch=10)
    dst = session.modifiers[0]
    fc1 = dst.targets[0]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    session.batch_start()  # the first masks: 2 of every 4 at random
    before = dst.masks()[f"{fc1.name}.weight"].clone()
    weight = fc1.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grad = fc1.weight.grad.detach().clone()  # dense: what growth is scored by
    session.before_optimizer_step()
    optimizer.step()
    optimizer.zero_grad()
    session.after_optimizer_step()  # the first update, after 1 step
    after = dst.masks()[f"{fc1.name}.weight"]
    # Pruned: the ceil(0.25 x active) smallest |w| of the whole layer's active weights.
    k = math.ceil(0.25 * int(before.sum()))
    order = torch.sort(torch.where(before, weight.abs(), torch.inf).flatten()).indices
    pruned = torch.zeros(before.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    survivors = before & ~pruned.view(before.shape)
    assert torch.equal(after & survivors, survivors)
    # Grown: in each group, as many as it lost, the largest |grad| of its free positions.
    assert torch.equal(after, survivors | nm_grow_mask(grad.abs(), survivors, 2, 4))
    assert torch.all(nm_group_counts(after, 4) == 2)
    assert int((after & ~before).sum()) > 0
    assert torch.all(fc1.weight[after & ~survivors] == 0)  # regrown weights start at 0


# --- exports ------------------------------------------------------------------------------
def nm_run_recipe() -> dict:
    """2:4 DST with head and MLP-neuron pruning on the digits, through the built-in trainer."""
    return {
        "name": "nm",
        "training": {"epochs": 1, "batch_size": 64, "schedule": {"warmup": 0}},
        "phases": [
            {
                "kind": "unstructured_dst",
                "sparsity": 0.5,
                "pattern": "2:4",
                "update_every": "4 steps",
                "min_update_interval": "1 steps",
            },
            {
                "kind": "head_prune_grow",
                "head_density": 0.7,
                "mlp_density": 0.5,
                "update_every": "4 steps",
                "min_update_interval": "1 steps",
            },
        ],
    }


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "nm"
    config = RunConfig(
        model="deit_tiny", data="digits", output=out, img_size=32, patch_size=8, extra={"depth": 2}
    )
    train(load_recipe(nm_run_recipe()), config, Console(quiet=True))
    return out


def test_exports_mark_the_layers_whose_weights_hold_the_pattern(nm_run: Path, tmp_path) -> None:
    masked = export_run(nm_run, tmp_path / "masked", compact=False)
    targets = {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc1")}
    fc2 = {f"blocks.{i}.mlp.fc2" for i in range(2)}
    assert masked.nm_layers == dict.fromkeys(sorted(targets | fc2), "2:4")
    model = load_compact(tmp_path / "masked")
    for name in masked.nm_layers:
        assert holds_nm(model.get_submodule(name).weight, 2, 4)
    # Compacted: whole heads leave proj's groups whole; single MLP neurons cut out of fc2's
    # inputs break its groups, so fc2 is not marked though the recipe trained it 2:4.
    compact = export_run(nm_run, tmp_path / "compact")
    assert compact.nm_layers == dict.fromkeys(sorted(targets), "2:4")
    model = load_compact(tmp_path / "compact")
    assert model.blocks[0].mlp.fc2.in_features < 768
    for name in compact.nm_layers:
        assert holds_nm(model.get_submodule(name).weight, 2, 4)
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert "blocks.0.mlp.fc1" in json.dumps(config)  # the mark is in the copy for people


def tiny_nm_export(tmp_path: Path, pattern: str = "2:4", **extra) -> tuple[Path, Manifest]:
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    torch.manual_seed(0)
    model = create_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recipe = nm_recipe(pattern, **extra)
    session = Session.from_recipe(load_recipe(recipe), model, optimizer, steps_per_epoch=3)
    for _ in range(3):
        train_step(session, model, optimizer, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    out = tmp_path / f"export-{pattern.replace(':', '-')}"
    manifest = export_model(
        spec, model.state_dict(), out, session.masks(), nm_patterns=[pattern], compact=False
    )
    return out, manifest


def test_marks_come_from_the_tensors_not_the_recipe(tmp_path) -> None:
    out, manifest = tiny_nm_export(tmp_path, targets={"roles": ["qkv", "fc1", "head"]})
    assert set(manifest.nm_layers) == {
        "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1", "head"
    }  # fmt: skip
    model = load_compact(out)
    masks = {
        f"{name}.weight": model.get_submodule(name).weight.ne(0) for name in manifest.nm_layers
    }
    # A mask that is not the pattern, or weights that break it, are not marked; the first
    # pattern that holds, by group size, is the one marked.
    broken = model.blocks[0].mlp.fc1.weight
    with torch.no_grad():
        broken[0, :4] = 1.0
    masks["blocks.0.mlp.fc1.weight"] = broken.ne(0)
    marks = nm_marks(model, masks, ["4:8", "2:4"])
    assert "blocks.0.mlp.fc1" not in marks
    assert set(marks.values()) == {"2:4"} and len(marks) == 4
    assert nm_marks(model, masks, []) == {}
    with pytest.raises(SparsekitError, match="not an N:M pattern"):
        nm_marks(model, masks, ["2/4"])


def test_an_export_without_a_pattern_keeps_the_hash_it_had(tmp_path) -> None:
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    manifest = export_model(spec, create_model(spec).state_dict(), tmp_path / "plain")
    assert manifest.nm_layers == {}
    # No marks: the field is left out of the hash, as if the format had never had it.
    assert b"nm_layers" not in canonical_json(manifest)
    marked = manifest.model_copy(update={"nm_layers": {"head": "2:4"}})
    assert b"nm_layers" in canonical_json(marked)


def test_the_marks_are_covered_by_the_hash(tmp_path) -> None:
    out, _ = tiny_nm_export(tmp_path)
    file = out / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    record = json.loads(metadata[METADATA_KEY])
    assert record["nm_layers"]["blocks.0.mlp.fc2"] == "2:4"
    record["nm_layers"]["blocks.0.mlp.fc2"] = "1:4"
    save_file(tensors, file, metadata={METADATA_KEY: json.dumps(record)})
    with pytest.raises(SparsekitError, match="do not match the hash"):
        read_export(out)


# --- accelerate -----------------------------------------------------------------------------
def test_the_plan_converts_only_what_semi_structured_tensors_can_hold(tmp_path) -> None:
    out, manifest = tiny_nm_export(tmp_path, targets={"roles": ["qkv", "proj", "fc1", "head"]})
    model = load_compact(out).half()
    plan = semi_structured_plan(model, manifest.nm_layers, str(out))
    assert sorted(plan.convert) == sorted(set(manifest.nm_layers) - {"head"})
    assert "10x192" in plan.dense["head"]  # 10 classes: not a whole block of rows
    # Each layer the plan converts survives torch's own 2:4 compression (CUTLASS layout, which
    # runs on a CPU) exactly: no third non-zero in a group for it to drop.
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    for name in plan.convert:
        weight = model.get_submodule(name).weight.detach()
        packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
        assert packed.numel() == weight.numel() // 2
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), weight)
    # The weights decide, not the mark: a layer marked 4:8 whose weights hold 2:4 converts;
    # once they do not (or in float32), it stays dense, with the reason.
    plan = semi_structured_plan(model, {"blocks.0.mlp.fc1": "2:4", "blocks.1.attn.qkv": "4:8"},
                                "x")  # fmt: skip
    assert plan.convert == ["blocks.0.mlp.fc1", "blocks.1.attn.qkv"]
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, :4] = 1.0
    plan = semi_structured_plan(model, {"blocks.1.attn.qkv": "4:8"}, "x")
    assert "not 2:4" in plan.dense["blocks.1.attn.qkv"]
    plan = semi_structured_plan(model.float(), {"blocks.0.mlp.fc1": "2:4"}, "x")
    assert "float32" in plan.dense["blocks.0.mlp.fc1"]
    with pytest.raises(SparsekitError, match="no Linear layer of that name"):
        semi_structured_plan(model, {"blocks.0.norm1": "2:4"}, "x")


@no_cuda
def test_accelerate_without_cuda_is_one_clear_error(tmp_path) -> None:
    out, _ = tiny_nm_export(tmp_path)
    with pytest.raises(SparsekitError) as info:
        load_compact(out, accelerate=True)
    text = str(info.value)
    assert "compute capability 8.0" in text and "no usable CUDA device" in text
    assert "without accelerate" in text and "\n" not in text
    with pytest.raises(SparsekitError, match="no usable CUDA"):
        accelerate_(load_compact(out), {"blocks.0.mlp.fc1": "2:4"}, "x")


def test_accelerate_refuses_an_export_without_marks_and_unknown_dtypes(tmp_path) -> None:
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    export_model(spec, create_model(spec).state_dict(), tmp_path / "plain")
    with pytest.raises(SparsekitError, match="marks no N:M-sparse layers"):
        load_compact(tmp_path / "plain", accelerate=True)
    with pytest.raises(SparsekitError, match="'float16' or 'bfloat16'"):
        load_compact(tmp_path / "plain", accelerate="float32")


@no_cuda
def test_the_benchmark_says_it_needs_cuda_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nm_speed.py")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "needs CUDA" in result.stdout and "Nothing measured" in result.stdout
