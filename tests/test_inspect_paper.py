"""`sparsekit inspect --convention paper`: the SViTE paper's own FLOPs convention reproduces its
published figures; `--json` carries both conventions; `--model` prices a recipe before training.

Published figures and their sources are in docs/export.md ("The paper's convention"). Rows the
convention does not reproduce are asserted at the value it gives, next to the published one,
so the gap stays visible instead of being tuned away.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sparsekit.analysis.cost import model_cost
from sparsekit.analysis.paper_flops import paper_cost, paper_layout, paper_model_cost
from sparsekit.cli.inspect import _priced
from sparsekit.cli.main import app
from sparsekit.export import export_model
from sparsekit.export.baked import baked_model
from sparsekit.models import ModelSpec, create_model

DOCS = Path(__file__).parents[1] / "docs"
DEIT = {
    "tiny": "deit_tiny_patch16_224",
    "small": "deit_small_patch16_224",
    "base": "deit_base_patch16_224",
}


@pytest.fixture(scope="module")
def deit() -> dict[str, torch.nn.Module]:
    """The three dense DeiTs at 224 px, random weights (pretrained=False)."""
    torch.manual_seed(0)
    return {size: create_model(ModelSpec(name)).eval() for size, name in DEIT.items()}


def g(macs: int, digits: int = 1) -> float:
    return round(macs / 1e9, digits)


def saving(cost, dense) -> float:
    return round(100 * (1 - cost.macs / dense.macs), 2)


def reference_units(model: torch.nn.Module, head_density: float, mlp_density: float):
    """Unit masks with the reference's budgets: int(density x units) per block
    (SViTE dst_utils/core.py, Masking.structure_init_new), the first units of each block."""
    masks = {}
    for i, block in enumerate(model.blocks):
        for name, units, density in (
            ("attn", block.attn.num_heads, head_density),
            ("mlp", block.mlp.fc2.in_features, mlp_density),
        ):
            keep = torch.zeros(units, dtype=torch.bool)
            keep[: int(units * density)] = True
            masks[f"blocks.{i}.{name}"] = keep
    return masks


@pytest.mark.parametrize(("size", "gmacs", "mparams"), [("tiny", 1.3, 5.7), ("small", 4.6, 22.1), ("base", 17.6, 86.6)])  # fmt: skip
def test_dense_deit_comes_out_at_the_papers_figures(deit, size, gmacs, mparams) -> None:
    dense = deit[size]
    paper = paper_model_cost(dense, dense)
    assert g(paper.macs) == gmacs
    assert round(paper.params / 1e6, 1) == mparams
    # Dense, the two conventions count the same products: runtime FLOPs are 2 x the MACs (up
    # to the odd random weight that is exactly 0, which the paper's count saves).
    assert model_cost(dense).flops == pytest.approx(2 * paper.macs, rel=1e-6)


# S2ViTE rows. (attention, MLP) densities: Tiny (0.7, 0.7) and Base (0.7, 0.6) are the
# reference's commands (cmd/vm/0428/deit_tiny_structure.sh, cmd/vm/0430/deit_base_structure.sh);
# for Small the reference's command is (0.5, 0.5), whose 12.3 M parameters do not fit the
# published 14.6 M, while (0.7, 0.6) does: that pair is our reading, not a published fact.
# Published (docs/export.md lists the sources): Tiny 4.2 M, 23.7%, 1.0 G; Small 14.6 M, 3.1 G;
# Base 56.8 M, 33.1%, 11.8 G; top-1 70.12 / 79.22 / 82.22.
@pytest.mark.parametrize(
    ("size", "att", "mlp", "mparams", "gmacs", "percent"),
    [("tiny", 0.7, 0.7, 4.2, 1.0, 23.68), ("small", 0.7, 0.6, 14.6, 3.1, 31.86)],
)
def test_s2vite_tiny_and_small_rows_as_published(deit, size, att, mlp, mparams, gmacs, percent):
    """Published at 0.1 M / 0.1 G (Tiny also 23.7% fewer FLOPs); ours to two decimals."""
    dense = deit[size]
    units = reference_units(dense, att, mlp)
    pruned = baked_model(ModelSpec(DEIT[size]), dense.state_dict(), {}, units)
    cost, base = paper_model_cost(pruned, dense), paper_model_cost(dense, dense)
    assert round(cost.params / 1e6, 1) == mparams
    assert g(cost.macs) == gmacs
    assert saving(cost, base) == percent
    assert {b.heads for b in cost.blocks} == {int(dense.blocks[0].attn.num_heads * att)}


def test_s2vite_base_row_reproduces_its_params_but_not_its_flops(deit) -> None:
    """Published: 56.8 M parameters, 33.1% (33.13%) fewer FLOPs, 11.8 G. The convention gives
    the parameters but 33.35% (11.7 G): not reproduced. No consistent count gets there: every
    pruned qkv row or MLP neuron saves `tokens` MACs per weight it removes, so at 56.8 M
    parameters the saving is pinned near 33.35% against a 17.56 G dense model."""
    dense = deit["base"]
    pruned = baked_model(
        ModelSpec(DEIT["base"]), dense.state_dict(), {}, reference_units(dense, 0.7, 0.6)
    )
    cost, base = paper_model_cost(pruned, dense), paper_model_cost(dense, dense)
    assert round(cost.params / 1e6, 1) == 56.8
    assert saving(cost, base) == 33.35  # published 33.13
    assert g(cost.macs) == 11.7  # published 11.8
    removed = base.params - cost.params
    assert (base.macs - cost.macs) / removed == pytest.approx(197, rel=0.01)


def _tiny_recipe(tmp_path: Path, **phases) -> Path:
    recipe = {
        "name": "priced",
        "training": {"epochs": 10, "batch_size": 64},
        "phases": list(phases.values()),
    }
    path = tmp_path / "priced.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_svite_plus_rows(tmp_path: Path) -> None:
    """SViTE+-Small at (5%, 50%): the reference's --density 0.5 over every 2-D and 4-D weight
    (ERK) and --token_number 187, the class token among the 187, i.e. 186 of 196 patches.
    Published: 49.32% fewer FLOPs, 80.18 top-1; ours 49.24% (2.33 G at the paper's two decimals
    of 4.6 x (1 - 0.4932) = 2.33 G, but 49.24 is not 49.32: not reproduced to the paper's
    rounding). (10%, 50%): --token_number 177; published top-1 79.91, its FLOPs not found."""
    recipe = _tiny_recipe(
        tmp_path,
        dst={
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "distribution": "erk",
            "update_every": "1 epochs",
            "min_update_interval": "1 steps",
            "targets": {"roles": ["qkv", "proj", "fc1", "fc2", "patch_embed", "head"]},
        },
        tokens={"kind": "token_select", "keep_ratio": 186 / 196, "before_block": 0},
    )
    _, _, model, dense = _priced("deit_small", {}, recipe, None, 1_281_167)
    base = paper_model_cost(dense, dense)
    layout = paper_layout(model, dense)
    assert {b.tokens for b in layout.blocks} == {187}
    cost = paper_cost(layout)
    assert g(cost.macs, 2) == 2.33
    assert saving(cost, base) == 49.24  # published 49.32
    ten = replace(layout, blocks=[replace(b, tokens=177) for b in layout.blocks])
    assert saving(paper_cost(ten), base) == 52.30  # published FLOPs not found
    # Unstructured zeros are saved in the paper's count, never in the runtime one.
    assert model_cost(model).flops > 2 * cost.macs


def test_json_fields_and_model_pricing(tmp_path: Path) -> None:
    recipe = _tiny_recipe(
        tmp_path,
        heads={"kind": "head_prune_grow", "head_density": 0.67, "mlp_density": 0.5},
        tokens={"kind": "token_select", "keep_ratio": 0.5, "before_block": 2},
    )
    args = ["inspect", "--model", "deit_tiny", "--recipe", str(recipe), "--img-size", "64"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) == {
        "version", "model", "model_kwargs", "source", "path", "recipe", "tokens", "runtime",
        "paper", "blocks",
    }  # fmt: skip
    assert record["model"] == DEIT["tiny"] and record["source"] == "model"
    assert record["model_kwargs"] == {"img_size": 64} and record["tokens"] == 17
    runtime, paper, blocks = record["runtime"], record["paper"], record["blocks"]
    assert set(runtime) == {
        "flops", "dense_flops", "ratio", "params", "dense_params", "nonzero_params",
    }  # fmt: skip
    assert set(paper) == {
        "macs", "dense_macs", "gmacs", "dense_gmacs", "saving", "params", "dense_params",
        "patch_embed_macs", "head_macs", "scorer_macs",
    }  # fmt: skip
    assert len(blocks) == 12
    assert set(blocks[0]) == {
        "block", "tokens", "dense_tokens", "heads", "dense_heads", "head_dim", "mlp_hidden",
        "dense_mlp_hidden", "weight_density", "params", "runtime", "paper",
    }  # fmt: skip
    assert set(blocks[0]["paper"]) == {"macs", "dense_macs", "linear_macs", "attention_macs"}
    # The budgets are the modifier's (2 of 3 heads, 384 of 768 neurons), tokens after block 2
    # the selector's: the class token and 8 of 16 patches.
    assert {b["heads"] for b in blocks} == {2} and {b["mlp_hidden"] for b in blocks} == {384}
    assert [b["tokens"] for b in blocks] == [17, 17] + [9] * 10
    assert runtime["flops"] == sum(b["runtime"]["flops"] for b in blocks) + 2 * (
        paper["patch_embed_macs"] + paper["head_macs"] + paper["scorer_macs"]
    )
    assert paper["macs"] == sum(b["paper"]["macs"] for b in blocks) + (
        paper["patch_embed_macs"] + paper["head_macs"] + paper["scorer_macs"]
    )
    assert paper["saving"] == pytest.approx(1 - paper["macs"] / paper["dense_macs"])
    # A pruned head keeps its proj columns and attention products in the paper's count.
    assert paper["macs"] > runtime["flops"] / 2
    # Both conventions agree with the library on the same priced model (random weights drawn
    # from a fixed seed: the same on every call).
    _, _, model, dense = _priced("deit_tiny", {"img_size": 64}, recipe, None, 1_281_167)
    assert runtime["flops"] == model_cost(model).flops
    assert paper["macs"] == paper_model_cost(model, dense).macs
    # Every field is documented, in the inspect section of docs/export.md.
    doc = (DOCS / "export.md").read_text(encoding="utf-8").split("## inspect", 1)[1]
    fields = {*record, *runtime, *paper, *blocks[0], *blocks[0]["paper"]}
    assert not [f for f in fields if f"`{f}`" not in doc and f".{f}`" not in doc]
    # The table of the paper convention prints the same total.
    result = CliRunner().invoke(app, [*args, "--convention", "paper"])
    assert result.exit_code == 0, result.output
    assert f"{paper['macs'] / 1e6:,.1f}" in result.output
    assert f"{round(100 * paper['saving'], 2):.2f}% FLOPs saving" in result.output


def test_default_convention_is_what_runs_and_exports_agree(tmp_path: Path) -> None:
    """Without --convention the table is the compacted model's runtime FLOPs, as before; a
    compact and a masked export of the same masks have the same paper figures."""
    torch.manual_seed(1)
    spec = ModelSpec(DEIT["tiny"], {"img_size": 64})
    plain = create_model(spec)
    units = reference_units(plain, 0.7, 0.5)
    masks = {"blocks.0.mlp.fc1.weight": torch.rand(768, 192) < 0.5}
    for compact in (True, False):
        export_model(spec, plain.state_dict(), tmp_path / str(compact), masks, units, compact=compact)  # fmt: skip
    records = []
    for compact in (True, False):
        result = CliRunner().invoke(app, ["inspect", str(tmp_path / str(compact)), "--json"])
        assert result.exit_code == 0, result.output
        records.append(json.loads(result.stdout))
    assert records[0]["source"] == "export"
    assert records[0]["paper"] == records[1]["paper"]
    compacted = baked_model(spec, plain.state_dict(), masks, units)
    runtime = model_cost(compacted).flops
    assert records[0]["runtime"]["flops"] == runtime
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "True")])
    assert result.exit_code == 0, result.output
    assert "MFLOPs" in result.output and f"{runtime / 1e6:,.1f}" in result.output
    assert "paper convention" not in result.output


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["inspect"], 2, "nothing to inspect"),
        (["inspect", "runs/x", "--model", "deit_tiny"], 2, "not both"),
        (["inspect", "no/such/folder"], 1, "does not exist"),
        (["inspect", "--model", "deit_nope"], 1, "unknown model"),
        (["inspect", "--model", "deit_tiny", "--set", "training.epochs=3"], 2, "--recipe"),
        (["inspect", ".", "--img-size", "64"], 2, "only go with --model"),
        (["inspect", "--model", "deit_tiny", "--recipe", "no/such.yaml"], 2, "no/such.yaml"),
    ],
)
def test_bad_input_is_one_paragraph_and_a_nonzero_exit(args, code, words) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.output.startswith("error:") and words in result.output
    assert result.output.count("error:") == 1 and "\n\n" not in result.output.strip()
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_invalid_recipe_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining: {epochs: 2}\nphases:\n  - kind: nope\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["inspect", "--model", "deit_tiny", "--recipe", str(bad)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "bad.yaml" in result.output
    assert "Traceback" not in result.output
    assert re.search(r"phases", result.output)


@pytest.mark.parametrize(
    "phase",
    [
        {"kind": "magnitude_prune", "sparsity": 0.7, "distribution": "uniform"},
        {"kind": "unstructured_dst", "sparsity": 0.7, "distribution": "uniform"},
    ],
    ids=["magnitude_prune", "unstructured_dst"],
)
def test_inspect_prices_every_masking_kind_at_its_first_masks(tmp_path: Path, phase) -> None:
    """Every kind that masks weights makes its first masks for `inspect --recipe` (a one-shot
    kind as well as a prune-and-grow one): 30% of the target weights are kept."""
    recipe = _tiny_recipe(tmp_path, weights=phase)
    args = ["inspect", "--model", "deit_tiny", "--recipe", str(recipe), "--img-size", "64"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    densities = {b["weight_density"] for b in json.loads(result.stdout)["blocks"]}
    assert densities and all(d == pytest.approx(0.3, abs=0.01) for d in densities), densities


@pytest.mark.parametrize(
    "name",
    ["vit_small_patch16_18x2_224", "vit_dpwee_patch16_reg1_gap_256", "eva02_tiny_patch14_224"],
)
def test_pruned_heads_are_priced_alike_compacted_or_masked(name: str) -> None:
    """Heads pruned in parallel blocks (two attentions, or heads beside the MLP in one
    in_proj) and in separate q/k/v count as pruned, whether compaction removed them or their
    rows are zero at full size: the same heads kept and the same MACs and parameters."""
    from sparsekit.surgery.layouts import head_groups

    spec = ModelSpec(name, {"img_size": 32, "depth": 2, "num_classes": 10, "embed_dim": 96})
    if name.startswith("eva02"):
        spec = ModelSpec(name, {**spec.kwargs, "patch_size": 8, "qkv_fused": False})
    torch.manual_seed(0)
    dense = create_model(spec).eval()
    units = {}
    for i, group in enumerate(head_groups(dense)):
        keep = torch.ones(group.units, dtype=torch.bool)
        keep[: 1 + i % 2] = False  # the branches of a block keep unalike
        units[group.name] = keep
    dropped = sum(int((~k).sum()) for k in units.values())
    state = dense.state_dict()
    compacted, masked = (baked_model(spec, state, {}, units, compact=c) for c in (True, False))
    base = paper_model_cost(dense, dense)
    for pruned in (compacted, masked):
        cost = paper_model_cost(pruned, dense)
        assert sum(b.heads for b in cost.blocks) == sum(b.heads for b in base.blocks) - dropped
    cost, again = paper_model_cost(compacted, dense), paper_model_cost(masked, dense)
    assert (cost.macs, cost.params) == (again.macs, again.params)
