"""Issue 13 (items 5-7): per-block unit budgets, the reference's schedules, and the shipped
recipes saying what they are.

The reference is VITA-Group/SViTE; the transcriptions below copy its formulas:
- head and neuron counts: `int(atten_head * atten_density)`, `int(channels * other_density)`
  (dst_utils/core.py:643, 699, `Masking.structure_init_new`);
- update fraction: `CosineDecay(death_rate, T_max=len(loader) * epochs)` with `eta_min=0.005`,
  a torch CosineAnnealingLR stepped once per iteration (core.py:37-46, 214-220, main.py:346);
- token temperature: `get_tau(10, 0.1, ite_step, total_iteration)`, linear over the whole run
  (engine.py:21-23, 37, 48).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_vit
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.compiler import compile_recipe
from sparsekit.errors import RecipeError
from sparsekit.modifiers.schedules import (
    REFERENCE_FRACTION_MIN,
    decayed_fraction,
    update_fraction,
)
from sparsekit.modifiers.token_select import TokenSelect
from sparsekit.recipe import load_recipe
from sparsekit.recipe.schema import HeadPruneGrowPhase, UnstructuredDSTPhase
from sparsekit.timeline import Timeline

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def head_phase(**fields) -> HeadPruneGrowPhase:
    recipe = load_recipe({"name": "t", "phases": [{"kind": "head_prune_grow", **fields}]})
    return recipe.phases[0]


# --- budgets ---------------------------------------------------------------------------------


def reference_count(units: int, density: float) -> int:
    """The reference's rounding (core.py:643, 699)."""
    return int(units * density)


@pytest.mark.parametrize(
    ("units", "density", "expected"),
    [
        (12, 0.4, 4),  # DeiT-Base at attention density 0.4: the reference keeps 4, round() 5
        (3, 0.5, 1),  # DeiT-Tiny at 0.5: the reference keeps 1, round() 2
        (12, 0.7, 8),
        (6, 0.7, 4),
        (6, 0.5, 3),
        (6, 0.4, 2),
        (3, 0.7, 2),
    ],
)
def test_head_density_rounds_down_as_the_reference(units, density, expected) -> None:
    phase = head_phase(head_density=density)
    assert phase.kept_units("heads", units) == expected == reference_count(units, density)


@pytest.mark.parametrize(
    ("units", "density"),
    [(3072, 0.6), (3072, 0.3), (3072, 0.4), (1536, 0.5), (1536, 0.3), (768, 0.7), (1536, 0.6)],
)
def test_mlp_density_rounds_down_as_the_reference(units, density) -> None:
    phase = head_phase(head_density=0.5, mlp_density=density)
    assert phase.kept_units("neurons", units) == reference_count(units, density)


def test_rounding_ignores_float_noise_and_keeps_the_minimums() -> None:
    # 0.29 x 100 is 28.999999999999996 in floats; a share that names 29 keeps 29.
    assert head_phase(head_density=0.5, mlp_density=0.29).kept_units("neurons", 100) == 29
    # The reference would keep int(0.9) = 0 heads; sparsekit keeps min_heads.
    assert head_phase(head_density=0.3).kept_units("heads", 3) == 1
    assert head_phase(head_density=0.3, min_heads=2).kept_units("heads", 3) == 2
    assert head_phase(head_density=0.5, mlp_density=0.001).kept_units("neurons", 100) == 1
    assert head_phase(head_density=1.0).kept_units("heads", 12) == 12
    # No MLP field: the MLP stays whole.
    assert head_phase(head_density=0.5).kept_units("neurons", 1536) == 1536


def test_exact_counts() -> None:
    phase = head_phase(heads=4, mlp_neurons=768)
    assert phase.kept_units("heads", 12) == 4
    assert phase.kept_units("neurons", 3072) == 768
    assert phase.kept_units("heads", 4) == 4
    assert phase.prunes_neurons and head_phase(head_density=0.5).prunes_neurons is False


def test_an_exact_count_above_the_model_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"heads: 4 in every block, .* have 3 heads"):
        head_phase(heads=4).kept_units("heads", 3)
    with pytest.raises(RecipeError, match=r"mlp_neurons: 800 .* have 768 MLP neurons"):
        head_phase(heads=1, mlp_neurons=800).kept_units("neurons", 768)
    with pytest.raises(ValueError, match="unknown unit kind"):
        head_phase(heads=1).kept_units("tokens", 3)


def _error(tmp_path: Path, phase_lines: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\ntraining:\n  epochs: 10\nphases:\n  - kind: head_prune_grow\n" + phase_lines
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("    head_density: 0.5\n    heads: 3\n", ["phases[0].heads (line 7)", "not both"]),
        ("    mlp_density: 0.5\n", ["phases[0] (line 5)", "give head_density", "or heads"]),
        (
            "    heads: 3\n    mlp_density: 0.5\n    mlp_neurons: 100\n",
            ["phases[0].mlp_neurons (line 8)", "not both"],
        ),
        ("    heads: 2\n    min_heads: 3\n", ["phases[0] (line 5)", "min_heads is 3"]),
        ("    heads: 0\n", ["phases[0].heads (line 6)", "greater than or equal to 1"]),
        ("    heads: 2.5\n", ["phases[0].heads (line 6)"]),
    ],
)
def test_budget_fields_explain_themselves(tmp_path: Path, lines: str, expected: list[str]):
    message = _error(tmp_path, lines)
    for part in expected:
        assert part in message, message


# --- update fraction -------------------------------------------------------------------------


class ReferenceCosineDecay:
    """The reference's CosineDecay (core.py:37-46), transcribed."""

    def __init__(self, death_rate, T_max, eta_min=0.005, last_epoch=-1):  # noqa: N803
        self.sgd = torch.optim.SGD(
            torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))]), lr=death_rate
        )
        self.cosine_stepper = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.sgd, T_max, eta_min, last_epoch
        )

    def step(self):
        self.cosine_stepper.step()

    def get_dr(self, death_rate):
        return self.sgd.param_groups[0]["lr"]


def dst_phase(**fields) -> UnstructuredDSTPhase:
    recipe = load_recipe(
        {"name": "t", "phases": [{"kind": "unstructured_dst", "sparsity": 0.5, **fields}]}
    )
    return recipe.phases[0]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("initial", [0.5, 0.3, 0.001])
def test_reference_fraction_matches_the_reference_cosine_decay(initial: float) -> None:
    total = 1000  # the run's iterations: the reference's T_max
    config = dst_phase(update_fraction=initial, fraction_decay="reference", end="80%")
    decay = ReferenceCosineDecay(initial, total)
    checked = 0
    for count in range(1, 801):
        decay.step()  # Masking.step() after each optimizer step (engine.py:71-72)
        # The window does not matter for this form: the reference decays over the whole run.
        ours = update_fraction(config, count, 200, 800, total)
        if count % 50 == 0 or count < 5:
            assert ours == pytest.approx(decay.get_dr(None), rel=1e-9, abs=1e-12), count
            checked += 1
    assert checked > 15
    # Where it starts and where it would end; past the run it holds its minimum.
    assert update_fraction(config, 0, 0, 800, total) == pytest.approx(initial)
    assert update_fraction(config, total, 0, 800, total) == pytest.approx(REFERENCE_FRACTION_MIN)
    assert update_fraction(config, 5 * total, 0, 800, total) == pytest.approx(0.005)
    # The reference's last update, at 80% of the run, replaces about 5%.
    expected = 0.005 + (initial - 0.005) * (1 + math.cos(0.8 * math.pi)) / 2
    assert update_fraction(config, 800, 0, 800, total) == pytest.approx(expected)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_window_forms_are_those_of_decayed_fraction(decay: str) -> None:
    config = dst_phase(update_fraction=0.4, fraction_decay=decay)
    for count in (0, 100, 150, 333, 500, 700, 900):
        progress = (count - 100) / (900 - 100)
        assert update_fraction(config, count, 100, 900, 1000) == decayed_fraction(
            0.4, progress, decay
        )
    assert update_fraction(config, 900, 100, 900, 1000) == pytest.approx(
        {"cosine": 0.0, "linear": 0.0, "constant": 0.4}[decay]
    )


def test_reference_fraction_works_for_head_phases_and_not_through_decayed_fraction() -> None:
    config = head_phase(head_density=0.5, fraction_decay="reference")
    assert update_fraction(config, 250, 0, 800, 1000) == pytest.approx(
        0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2
    )
    with pytest.raises(ValueError, match="update_fraction"):
        decayed_fraction(0.5, 0.5, "reference")


# --- token temperature -----------------------------------------------------------------------


def reference_tau(ite: int, total: int) -> float:
    """engine.py:21-23 with the arguments of engine.py:48."""
    start_tau, end_tau = 10, 0.1
    return start_tau + (end_tau - start_tau) * ite / total


def token_modifier(**phase) -> TokenSelect:
    recipe = load_recipe(
        {
            "name": "tokens",
            "training": {"epochs": 2, "batch_size": 32, "schedule": {"warmup": 0}},
            "phases": [{"kind": "token_select", "keep_ratio": 0.75, **phase}],
        }
    )
    (modifier,) = compile_recipe(recipe, tiny_vit(), Timeline(2, 10))
    return modifier


def test_linear_temperature_is_the_reference_schedule() -> None:
    modifier = token_modifier(temperature_decay="linear")  # start 0, end 100%: the whole run
    for step in range(21):
        assert modifier.temperature(step) == pytest.approx(reference_tau(step, 20))
    assert modifier.temperature(10) == pytest.approx(5.05)  # halfway, where geometric gives 1


def test_linear_and_geometric_over_a_window() -> None:
    linear = token_modifier(temperature_decay="linear", start="25%", end="75%")
    geometric = token_modifier(start="25%", end="75%")  # the default
    assert geometric.config.temperature_decay == "geometric"
    for step, lin, geo in ((0, 10.0, 10.0), (5, 10.0, 10.0), (10, 5.05, 1.0), (15, 0.1, 0.1)):
        assert linear.temperature(step) == pytest.approx(lin)
        assert geometric.temperature(step) == pytest.approx(geo)
    assert linear.temperature(19) == pytest.approx(0.1)


# --- recipe show --model ---------------------------------------------------------------------


def _recipe(tmp_path: Path, phase: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\ntraining:\n  epochs: 10\nphases:\n{phase}")
    return path


def test_recipe_show_prints_units_per_block_for_a_model(tmp_path: Path) -> None:
    path = _recipe(
        tmp_path,
        "  - {kind: head_prune_grow, head_density: 0.4, mlp_density: 0.6}\n"
        "  - {kind: token_select, keep_ratio: 0.95}\n",
    )
    result = runner.invoke(app, ["recipe", "show", str(path), "--model", "deit_base"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "deit_base_patch16_224 at 224 px" in out
    assert out.count("4 of 12") == 12  # every block: floor(0.4 x 12) heads
    assert out.count("1,843 of 3,072") == 12
    assert "48 of 144" in out and "22,116 of 36,864" in out
    text = " ".join(out.split())
    assert "keeps 187 of 196 patch tokens (ceil(0.95 x 196)), 188 tokens with the class" in text

    result = runner.invoke(
        app,
        [
            "recipe",
            "show",
            str(path),
            "--model",
            "deit_tiny",
            "--set",
            "phases[0].head_density=0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("1 of 3") == 12  # DeiT-Tiny at 0.5: 1 head, as the reference


def test_recipe_show_without_a_model_says_what_is_missing(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "  - {kind: head_prune_grow, heads: 2}\n")
    result = runner.invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps lines
    assert "heads 2 per" in text  # (the table may wrap the cell)
    assert "add --model NAME" in text and "of 12" not in text


def test_recipe_show_refuses_counts_the_model_does_not_have(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "  - {kind: head_prune_grow, heads: 4}\n")
    result = runner.invoke(app, ["recipe", "show", str(path), "--model", "deit_tiny"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "heads: 4 in every block" in text and "3 heads" in text
    assert "Traceback" not in result.output


# --- shipped recipes -------------------------------------------------------------------------

SHIPPED = sorted(ROOT.joinpath("recipes").rglob("*.yaml"))
PAPER = sorted(ROOT.joinpath("recipes", "paper").glob("*.yaml"))
ALL_ROLES = {"qkv", "proj", "fc1", "fc2", "patch_embed", "head"}


def test_paper_rows_are_all_there() -> None:
    names = {p.stem for p in PAPER}
    assert {
        "s2vite_tiny_att70_mlp70",
        "s2vite_small_att50_mlp50",
        "s2vite_base_att70_mlp60",
        "svite_small_sp50",
        "svite_base_sp40",
        "svite_plus_small_sp50_tok5",
        "svite_plus_small_sp50_tok10",
    } <= names
    assert len({p.stem for p in SHIPPED}) == len(SHIPPED)  # run folders are named by recipe


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_recipes_name_their_row_and_published_numbers(path: Path) -> None:
    head = path.read_text().split("version: 1")[0]
    assert head.startswith("# Paper row: "), head
    for word in ("Published", "top-1", "params", "FLOPs"):
        assert word in head, (word, head)


# The paper's 600-epoch recipes; a short-run recipe (svite_plus_digits) spaces its updates.
REFERENCE = [p for p in SHIPPED if "svite" in p.stem and "epochs: 600" in p.read_text()]


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.name)
def test_reference_recipes_use_the_reference_schedules_and_targets(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for phase in recipe.phases:
        if phase.kind in ("unstructured_dst", "head_prune_grow"):
            assert phase.fraction_decay == "reference" and phase.update_fraction == 0.5
            assert phase.end.value == 0.8
        if phase.kind == "unstructured_dst":
            assert set(phase.targets.roles) == ALL_ROLES  # as the reference masks
        if phase.kind == "token_select":
            assert phase.temperature_decay == "linear"
            assert (phase.temperature_start, phase.temperature_end) == (10.0, 0.1)
            assert phase.start.value == 0 and phase.end.value == 1.0


def test_names_say_what_the_recipes_are() -> None:
    for path in SHIPPED:
        kinds = {p.kind for p in load_recipe(path).phases}
        if path.stem.startswith("svite_plus"):
            assert {"unstructured_dst", "token_select"} <= kinds, path
        elif path.stem.startswith("svite"):
            assert kinds == {"unstructured_dst"}, path
        elif path.stem.startswith("s2vite"):
            assert kinds == {"head_prune_grow"}, path
