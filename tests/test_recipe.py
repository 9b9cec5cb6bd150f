"""Recipe schema, loader errors and overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekit.errors import RecipeError
from sparsekit.recipe import Recipe, Span, load_recipe

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").rglob("*.yaml"))  # paper/ too

GOOD = """\
version: 1
name: ok
training:
  epochs: 10
phases:
  - kind: unstructured_dst
    sparsity: 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_svite_recipes_carry_paper_settings() -> None:
    by_name = {p.stem: load_recipe(p) for p in RECIPES}
    for name, sparsity in (
        ("svite_tiny", 0.5),
        ("svite_small", 0.5),
        ("svite_base", 0.4),
        ("svite_plus_small", 0.5),
        ("svite_plus_small_10", 0.5),
        ("svite_small_sp50", 0.5),
        ("svite_small_sp60", 0.6),
        ("svite_base_sp40", 0.4),
    ):
        dst = by_name[name].phases[0]
        assert dst.kind == "unstructured_dst" and dst.sparsity == sparsity
        assert (dst.distribution, dst.grow, dst.prune) == ("erk", "gradient", "magnitude")
        assert dst.update_fraction == 0.5 and dst.fraction_decay == "reference"
        assert dst.end == Span(0.8, "fraction")
        assert set(dst.targets.roles) == {"qkv", "proj", "fc1", "fc2", "patch_embed", "head"}
        assert by_name[name].training.epochs == 600
    for name, keep in (("svite_plus_small", 0.95), ("svite_plus_small_10", 0.90)):
        tokens = by_name[name].phases[1]
        assert tokens.kind == "token_select" and tokens.keep_ratio == keep
        assert tokens.temperature_decay == "linear"
    for name, heads, mlp in (
        ("s2vite_small", 0.5, 0.5),
        ("s2vite_tiny_att70_mlp70", 0.7, 0.7),
        ("s2vite_small_att50_mlp50", 0.5, 0.5),
        ("s2vite_small_att70_mlp60", 0.7, 0.6),
        ("s2vite_base_att70_mlp60", 0.7, 0.6),
    ):
        phase = by_name[name].phases[0]
        assert (phase.head_density, phase.mlp_density) == (heads, mlp)
        assert phase.fraction_decay == "reference" and phase.end == Span(0.8, "fraction")


def test_good_recipe_fills_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD))
    dst = recipe.phases[0]
    assert dst.end == Span(0.8, "fraction") and dst.start == Span(0, "epochs")
    assert dst.targets.roles == ["qkv", "proj", "fc1", "fc2"]
    assert recipe.training.optimizer.name == "adamw"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown key, with the closest key suggested and the line named
        (
            GOOD.replace("  epochs: 10", "  epochz: 10"),
            ["training.epochz (line 4)", "did you mean 'epochs'"],
        ),
        # unknown key in a phase: that phase kind's keys are listed, and the closest suggested
        (
            GOOD.replace("sparsity: 0.5", "sparsity: 0.5\n    grow_acumulation: 2"),
            [
                "phases[0].grow_acumulation (line 8)",
                "did you mean 'grow_accumulation'",
                "allowed keys: name, start, end, kind, sparsity, distribution",
            ],
        ),  # fmt: skip
        (
            GOOD.replace("unstructured_dst", "magnitude_prune") + "    end: 5\n",
            ["phases[0].end (line 8)", "allowed keys: name, start, kind, sparsity, distribution"],
        ),
        # wrong type
        (GOOD.replace("epochs: 10", "epochs: ten"), ["training.epochs (line 4)", "integer"]),
        # negative sparsity
        (
            GOOD.replace("sparsity: 0.5", "sparsity: -0.2"),
            ["phases[0].sparsity (line 7)", "greater than 0"],
        ),
        # window end before start
        (GOOD + "    start: 5\n    end: 2\n", ["phases[0].end (line 9)", "must come after start"]),
        # unknown kind, with allowed values and a suggestion
        (
            GOOD.replace("unstructured_dst", "unstructured_dts"),
            [
                "phases[0] (line 6)",
                "allowed values: dense_warmup, unstructured_dst",
                "did you mean 'unstructured_dst'",
            ],
        ),
        # unknown target role
        (
            GOOD + "    targets:\n      roles: [qkv, fc3]\n",
            [
                "phases[0].targets.roles[1] (line 9)",
                "allowed values: qkv, proj",
                "did you mean 'fc2'",
            ],
        ),
        # bad literal value
        (
            GOOD.replace("    sparsity: 0.5", "    sparsity: 0.5\n    distribution: erdos"),
            ["phases[0].distribution (line 8)", "allowed values: erk, uniform"],
        ),
        # two DST phases on the same weights
        (
            GOOD + "  - kind: unstructured_dst\n    sparsity: 0.3\n",
            ["phases[1].targets.roles", "both make roles"],
        ),
        # sparse phase inside a dense warm-up
        (GOOD + "  - kind: dense_warmup\n    end: 3\n", ["phases[0].start", "dense warm-up"]),
        # a window past the end of the run
        (GOOD + "    end: 50\n", ["phases[0].end (line 8)", "run has 10 epochs", "'80%'"]),
        # an unreadable time span
        (GOOD + "    update_every: soon\n", ["phases[0].update_every (line 8)", "'500 steps'"]),
        # missing required field
        (GOOD.replace("    sparsity: 0.5\n", ""), ["phases[0].sparsity", "required"]),
        # malformed YAML
        ("name: x\n  training: [\n", ["not valid YAML", "line"]),
        # empty file
        ("", ["empty"]),
        # not a mapping
        ("- a\n- b\n", ["must be a YAML mapping"]),
        # object-building tags are refused
        ("name: !!python/object/apply:os.system ['echo hi']\n", ["not valid YAML", "refused"]),
        # duplicate keys
        ("name: a\nname: b\n", ["appears twice"]),
    ],
)
def test_bad_recipes_explain_themselves(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = error_of(tmp_path, text)
    for part in expected:
        assert part in message, message


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("epochs: 10", "epochs: -1").replace("sparsity: 0.5", "sparsity: 2")
    message = error_of(tmp_path, text)
    assert (
        "2 problems" in message and "training.epochs" in message and "phases[0].sparsity" in message
    )


def test_overrides_apply_and_validate(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    recipe = load_recipe(
        path,
        [
            "training.epochs=3",
            "training.schedule.warmup=1",
            "phases[0].sparsity=0.6",
            "phases[0].end=50%",
        ],
    )
    assert recipe.training.epochs == 3
    assert recipe.phases[0].sparsity == 0.6 and recipe.phases[0].end == Span(0.5, "fraction")
    recipe = load_recipe(path, ["training.optimizer.lr=1e-3", "phases[0].targets.roles=[fc1]"])
    assert recipe.training.optimizer.lr == 1e-3 and recipe.phases[0].targets.roles == ["fc1"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("phases[0].sparsity=1.5", "from --set phases[0].sparsity=1.5"),
        ("phases[3].sparsity=0.5", "phases[3] does not exist"),
        ("training.epochz=3", "did you mean 'epochs'"),
        ("training..epochs=3", "expected PATH=VALUE"),
        ("training.epochs", "expected PATH=VALUE"),
        ("[0]=1", "expected PATH=VALUE"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, expected: str) -> None:
    assert expected in error_of(tmp_path, GOOD, [override])


@pytest.mark.parametrize(
    ("raw", "span"),
    [
        (6, Span(6, "epochs")),
        (0.5, Span(0.5, "epochs")),
        ("6 epochs", Span(6, "epochs")),
        ("1 epoch", Span(1, "epochs")),
        ("500 steps", Span(500, "steps")),
        ("80%", Span(0.8, "fraction")),
        ("0.13%", Span(0.0013, "fraction")),
    ],
)
def test_span_spellings(raw, span: Span) -> None:
    assert Span.parse(raw) == span
    assert Span.parse(span.to_yaml()) == span


@pytest.mark.parametrize(
    "raw", [-1, float("nan"), float("inf"), True, "150%", "1.5 steps", "soon", None]
)
def test_span_rejects(raw) -> None:
    with pytest.raises(ValueError):
        Span.parse(raw)


def test_json_schema_describes_phases() -> None:
    schema = Recipe.model_json_schema()
    text = json.dumps(schema)
    assert "unstructured_dst" in text and "dense_warmup" in text
    assert schema["additionalProperties"] is False


def test_recipe_package_imports_no_torch() -> None:
    code = "import sparsekit.recipe, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_phase_kind_has_a_modifier() -> None:
    from sparsekit.modifiers import MODIFIERS
    from sparsekit.recipe.schema import PHASE_KINDS, PHASES, Phase

    union = {p.model_fields["kind"].annotation.__args__[0] for p in Phase.__origin__.__args__}
    registered = {config.kind_name() for config in MODIFIERS}  # keyed by config class
    assert set(PHASE_KINDS) == union == registered and len(PHASES) == len(union)
    assert set(MODIFIERS) == set(PHASES)


def test_linear_lr_scaling_follows_the_global_batch() -> None:
    """DeiT's rule, kept by the SViTE code: lr x global batch / 512, peak only."""
    base = {"name": "scaled", "training": {"batch_size": 1024, "optimizer": {"lr": 5e-4}}}
    assert load_recipe(base).training.peak_lr == 5e-4  # lr_scaling: none is the default
    scaled = load_recipe(base, ["training.optimizer.lr_scaling=linear"]).training
    assert scaled.peak_lr == pytest.approx(1e-3)
    assert scaled.describe_lr() == "lr 0.0005 x 1024 / 512 = 0.001 (lr_scaling: linear)"
    assert scaled.schedule.warmup_lr == 1e-6  # not scaled, as in the reference
    other = load_recipe(
        base,
        ["training.optimizer.lr_scaling=linear", "training.optimizer.lr_base_batch=256"],
    )
    assert other.training.peak_lr == pytest.approx(2e-3)
    with pytest.raises(RecipeError, match=r"lr_scaling.*above 10"):
        load_recipe(
            base,
            [
                "training.optimizer.lr_scaling=linear",
                "training.optimizer.lr=9",
                "training.batch_size=4096",
            ],
        )


def test_recipe_show_prints_the_scaled_learning_rate(tmp_path) -> None:
    from typer.testing import CliRunner

    from sparsekit.cli.main import app

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: scaled\ntraining:\n  batch_size: 1024\n  optimizer: {lr_scaling: linear}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "lr 0.0005 x 1024 / 512 = 0.001" in result.output
