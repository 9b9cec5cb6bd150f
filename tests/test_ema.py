"""training.ema: timm's moving average of the weights, exactly as sparse as the model; evaluated
every epoch, checkpointed (resume stays bit-exact) and exported with `sparsekit export --ema`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_vit, train_step
from rich.console import Console
from typer.testing import CliRunner

from sparsekit import Session, load_recipe
from sparsekit.cli.main import app
from sparsekit.errors import RecipeError
from sparsekit.export import load_compact, read_export
from sparsekit.export.baked import baked_model
from sparsekit.recipe.ema import Ema
from sparsekit.recipe.load import dump_recipe
from sparsekit.recipe.span import Span
from sparsekit.run_folder.checkpoint import load_checkpoint
from sparsekit.run_folder.trained_run import open_run
from sparsekit.surgery.compact import bake_
from sparsekit.timeline import Timeline
from sparsekit.train.ema import SparseEma
from sparsekit.train.tensorboard_log import scalars
from sparsekit.train.trainer import RunConfig, train

ROOT = Path(__file__).parents[1]
runner = CliRunner()

# Heads gated (their weights kept, frozen), fc1 weights masked: both kinds of sparsity.
PHASES = [
    {
        "kind": "head_prune_grow",
        "head_density": 0.5,
        "update_every": "3 steps",
        "min_update_interval": "1 steps",
        "end": "100%",
    },
    {
        "kind": "unstructured_dst",
        "sparsity": 0.5,
        "update_every": "3 steps",
        "min_update_interval": "1 steps",
        "targets": {"roles": ["fc1"]},
    },
]
RECIPE = {
    "name": "ema",
    "training": {
        "epochs": 3,
        "batch_size": 32,
        "drop_path": 0.1,
        "schedule": {"warmup": 1},
        "optimizer": {"lr": 1e-3},
        "ema": {"decay": 0.8},
    },
    "phases": PHASES,
}
MODEL = {"depth": 2, "num_heads": 4}


def train_run(tmp_path: Path, name: str, recipe: dict = RECIPE, **kwargs) -> dict:
    config = RunConfig(
        model="vit_tiny_patch16_224",
        data="synthetic",
        output=tmp_path / name,
        extra=MODEL,
        **kwargs,
    )
    return train(load_recipe(recipe), config, Console(quiet=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 3-epoch run with an EMA (shared by the tests that only read it)."""
    root = tmp_path_factory.mktemp("ema")
    train_run(root, "full")
    return root / "full"


# --- the recipe ------------------------------------------------------------------------------
def test_the_recipe_field_defaults_to_the_reference_and_round_trips() -> None:
    assert load_recipe({"name": "x"}).training.ema is None  # off unless asked for
    recipe = load_recipe({"name": "x", "training": {"ema": {}}})
    assert recipe.training.ema == Ema(decay=0.99996, start=Span(0, "epochs"), warmup=False)
    warm = load_recipe(
        {"name": "x", "training": {"ema": {"warmup": True, "warmup_power": 0.75, "start": "10%"}}}
    )
    for r in (recipe, warm):  # recipe.yaml holds every default written out, and reads back
        assert load_recipe(json.loads(json.dumps(r.model_dump(mode="json")))) == r
        assert dump_recipe(r)
    on = load_recipe({"name": "x"}, overrides=["training.ema.decay=0.999"])
    assert on.training.ema.decay == 0.999


@pytest.mark.parametrize(
    ("ema", "message"),
    [
        ({"decay": 1}, "less than 1"),
        ({"decay": 0}, "greater than 0"),
        ({"warmup_power": 0.5}, "warmup_power only shapes the ramp of warmup: true"),
        ({"decay": 0.9, "dacay": 0.9}, "dacay"),
        ({"start": "5 parsecs"}, "cannot read"),
    ],
)
def test_bad_ema_settings_are_recipe_errors(ema: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe({"name": "x", "training": {"ema": ema}})


def test_every_ema_field_is_documented() -> None:
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert "### training.ema" in text
    missing = [field for field in Ema.model_fields if f"`{field}`" not in text]
    assert not missing, missing
    assert "--ema" in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert "--ema" in (ROOT / "docs" / "export.md").read_text(encoding="utf-8")


# --- the average, step by step ---------------------------------------------------------------
def _session(ema: dict, steps_per_epoch: int = 4):
    torch.manual_seed(0)
    model = tiny_vit(**MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recipe = load_recipe({**RECIPE, "training": {**RECIPE["training"], "ema": ema}})
    session = Session.from_recipe(recipe, model, optimizer, steps_per_epoch)
    average = SparseEma(recipe.training.ema, model, session.timeline)
    return model, optimizer, session, average


def _batches(count: int):
    data = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield torch.randn(8, 3, 32, 32, generator=data), torch.randint(0, 10, (8,), generator=data)


def _kept_pattern(session: Session) -> dict[str, torch.Tensor]:
    """1 where the session keeps a weight, 0 where a mask or a dropped head zeroes it."""
    ones = tiny_vit(**MODEL)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    bake_(ones, session.masks(), session.unit_masks(), compact=False)
    return ones.state_dict()


def test_each_update_averages_then_zeroes_what_the_session_drops() -> None:
    model, optimizer, session, average = _session({"decay": 0.75})
    before = {k: v.clone() for k, v in average.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for step, (x, y) in enumerate(_batches(7)):
        train_step(session, model, optimizer, x, y)
        average.update(model, session)
        live = model.state_dict()
        pattern = _kept_pattern(session)
        for name, value in average.state_dict().items():
            expected = (0.75 * before[name] + 0.25 * live[name]) * pattern[name]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=f"{step} {name}")
            # Zero exactly where the session drops a weight, head row or head column.
            assert value[pattern[name] == 0].eq(0).all(), name
        before = {k: v.clone() for k, v in average.state_dict().items()}
    dropped = {n: ~k for n, k in session.unit_masks().items()}
    assert all(d.any() for d in dropped.values())  # heads really are gated off ...
    qkv = model.get_parameter("blocks.0.attn.qkv.weight")
    assert qkv.abs().sum(1).eq(0).sum() == 0  # ... and keep their weights in the live model,
    ema_qkv = average.state_dict()["blocks.0.attn.qkv.weight"]  # ... but not in the average
    rows = 3 * model.blocks[0].attn.head_dim * int(dropped["blocks.0.attn"].sum())
    assert ema_qkv.abs().sum(1).eq(0).sum() == rows
    fc1 = session.masks()["blocks.0.mlp.fc1.weight"]
    assert not fc1.all() and _nonzero_share(average.state_dict()["blocks.0.mlp.fc1.weight"], fc1)


def _nonzero_share(value: torch.Tensor, kept: torch.Tensor) -> bool:
    """Zero wherever `kept` is not; non-zero nearly everywhere it is (a weight grown at the last
    update starts at 0, in the model and in its average)."""
    kept = kept.to(torch.bool)
    return bool(value[~kept].eq(0).all()) and value[kept].ne(0).float().mean() > 0.9


def test_the_average_copies_the_model_until_start_then_ramps_as_timm_does() -> None:
    model, optimizer, session, average = _session({"decay": 0.9, "start": "3 steps"})
    for completed, (x, y) in enumerate(_batches(5), 1):
        train_step(session, model, optimizer, x, y)
        average.update(model, session)
        pattern = _kept_pattern(session)
        copied = all(
            torch.equal(average.state_dict()[n], v * pattern[n])
            for n, v in model.state_dict().items()
        )
        assert copied == (completed <= 3), completed
    cfg = Ema(decay=0.999, start=Span(2, "steps"), warmup=True, warmup_power=0.5, warmup_gamma=4)
    warm = SparseEma(cfg, tiny_vit(**MODEL), Timeline(1, 10))
    assert warm.timm.get_decay(2 + 1) == 0.0  # 2 steps completed: still the start
    for t in (1, 5, 40):  # t steps after start: 1 - (1 + t / gamma) ** -power, capped at decay
        assert warm.timm.get_decay(2 + t + 1) == pytest.approx(min(0.999, 1 - (1 + t / 4) ** -0.5))


def test_evaluating_the_average_in_the_live_model_leaves_the_model_bit_for_bit() -> None:
    model, optimizer, session, average = _session({"decay": 0.5})
    for x, y in _batches(5):
        train_step(session, model, optimizer, x, y)
        average.update(model, session)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        with average.swapped_in(model):
            swapped = model(x)
        mine = model(x)
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())
    plain = tiny_vit(**MODEL)
    plain.load_state_dict(average.state_dict())
    bake_(plain, session.masks(), session.unit_masks(), compact=False)
    with torch.no_grad():
        torch.testing.assert_close(swapped, plain.eval()(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped, mine)  # it really was the average that ran


def test_a_skipped_step_leaves_the_average_alone(tmp_path: Path) -> None:
    from sparsekit.train.distributed import Ranks
    from sparsekit.train.nonfinite import NonFiniteLosses
    from sparsekit.train.trainer import DeviceSums, build_run
    from sparsekit.train.trainer import train_step as trainer_step

    recipe = load_recipe(
        {**RECIPE, "training": {**RECIPE["training"], "nonfinite_loss": "skip"}, "phases": []}
    )
    config = RunConfig(model="vit_tiny_patch16_224", data="synthetic", extra=MODEL)
    cpu = torch.device("cpu")
    run = build_run(recipe, config, tmp_path / "r", Ranks(), cpu, Console(quiet=True))
    images, labels = next(iter(run.loader))
    losses, sums = NonFiniteLosses("skip", cpu), DeviceSums(cpu)
    start = {k: v.clone() for k, v in run.ema.state_dict().items()}
    criterion = run.criterion
    run.criterion = lambda *args: criterion(*args) * float("nan")
    trainer_step(run, images, labels, sums, losses, 0)
    assert run.session.step == 1
    assert all(torch.equal(start[k], v) for k, v in run.ema.state_dict().items())
    run.criterion = criterion
    trainer_step(run, images, labels, sums, losses, 0)
    assert not all(torch.equal(start[k], v) for k, v in run.ema.state_dict().items())


# --- the trainer -----------------------------------------------------------------------------
def test_the_average_is_evaluated_every_epoch_and_logged(trained: Path) -> None:
    lines = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert len(epochs) == 3
    assert all(0 <= r["ema_val_acc"] <= 1 and r["ema_val_loss"] > 0 for r in epochs)
    assert any(r["ema_val_loss"] != r["val_loss"] for r in epochs)
    with open(trained / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["ema_val_acc"]) for r in rows] == [r["ema_val_acc"] for r in epochs]
    assert scalars(epochs[-1])["val/ema_acc"] == epochs[-1]["ema_val_acc"]
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["ema_val_acc"] == epochs[-1]["ema_val_acc"]


def test_a_run_without_ema_logs_no_ema_columns(tmp_path: Path) -> None:
    recipe = {**RECIPE, "training": {**RECIPE["training"], "ema": None}}
    train_run(tmp_path, "plain", recipe, stop_after_epoch=1)
    header = (tmp_path / "plain" / "metrics.csv").read_text().splitlines()[0]
    assert "ema" not in header
    assert "ema" not in load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "plain"), "--ema"])
    assert result.exit_code == 1
    assert "trained without a moving average" in result.output
    assert "Leave out --ema" in result.output and "Traceback" not in result.output


def test_resume_with_ema_reproduces_an_uninterrupted_run(trained: Path, tmp_path: Path) -> None:
    assert train_run(tmp_path, "split", stop_after_epoch=1) == {"stopped_at_epoch": 1}
    resumed = train_run(tmp_path, "split", resume=True)
    a = load_checkpoint(trained / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["ema"].keys() == a["model"].keys() == b["ema"].keys()
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert not all(torch.equal(a["ema"][k], v) for k, v in a["model"].items())
    full = json.loads((trained / "summary.json").read_text())
    assert (full["val_acc"], full["ema_val_acc"]) == (resumed["val_acc"], resumed["ema_val_acc"])


# --- export ----------------------------------------------------------------------------------
def _masked_ema_model(run_dir: Path, best: bool = False) -> torch.nn.Module:
    run = open_run(run_dir, best=best)
    ema = load_checkpoint(run_dir / ("checkpoint-best.pt" if best else "checkpoint.pt"))["ema"]
    return baked_model(run.spec, ema, run.masks, run.unit_masks, run.placements, compact=False)


@pytest.mark.parametrize("best", [False, True])
def test_the_ema_export_is_the_masked_ema_model_compacted(
    trained: Path, tmp_path: Path, best: bool
) -> None:
    out = tmp_path / "ema"
    args = ["export", str(trained), "--ema", "-o", str(out), *(["--best"] if best else [])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "EMA weights" in result.output
    compact = load_compact(out).eval()
    run = open_run(trained, best=best, ema=True)
    heads = [int(k.sum()) for n, k in sorted(run.unit_masks.items()) if n.endswith(".attn")]
    assert [b.attn.num_heads for b in compact.blocks] == heads  # pruned heads removed
    assert heads != [4, 4]
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            compact(x), _masked_ema_model(trained, best)(x), rtol=1e-5, atol=1e-5
        )
    # Not the model's own weights: exporting those gives another function.
    own = tmp_path / "own"
    own_args = ["export", str(trained), "-o", str(own), *(["--best"] if best else [])]
    assert runner.invoke(app, own_args).exit_code == 0
    with torch.no_grad():
        assert not torch.allclose(compact(x), load_compact(own).eval()(x), atol=1e-4)


def test_the_masked_ema_export_is_zero_exactly_where_the_masks_are(
    trained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masked"
    result = runner.invoke(app, ["export", str(trained), "--ema", "--masked", "-o", str(out)])
    assert result.exit_code == 0, result.output
    _, tensors = read_export(out)  # as stored, expanded (sparse tensors are stored compressed)
    run = open_run(trained, ema=True)
    ema = load_checkpoint(trained / "checkpoint.pt")["ema"]
    pattern = baked_model(
        run.spec,
        {k: torch.ones_like(v) for k, v in ema.items()},
        run.masks,
        run.unit_masks,
        compact=False,
    ).state_dict()
    masked = [n for n in ema if "qkv" in n or "proj" in n or "fc1" in n or "fc2" in n]
    for name in masked:
        # The trained average itself is already exactly that sparse; the export bakes nothing.
        assert _nonzero_share(ema[name], pattern[name] != 0), name
        assert torch.equal(tensors[name], ema[name]), name
    assert all(torch.equal(run.weights[k], v) for k, v in ema.items())  # open_run(ema=True)
