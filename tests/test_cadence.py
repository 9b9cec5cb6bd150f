"""Update cadences that scale down: `updates: N`, the `min_update_interval` floor with its note,
and shipped recipes that can be shortened to any length."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.errors import RecipeError
from sparsekit.recipe import load_recipe
from sparsekit.recipe.cadence import (
    MIN_STEPS_BETWEEN_UPDATES,
    cadence_notes,
    update_cadence,
)
from sparsekit.timeline import Timeline

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").rglob("*.yaml"))
runner = CliRunner()


def recipe(epochs: int = 10, **phase):
    return load_recipe(
        {
            "name": "c",
            "training": {"epochs": epochs, "schedule": {"warmup": 0}},
            "phases": [{"kind": "unstructured_dst", "sparsity": 0.5, **phase}],
        }
    )


@pytest.mark.parametrize(("window", "updates", "every"), [(100, 4, 20), (101, 4, 21), (10, 4, 2)])
def test_updates_are_spread_strictly_inside_the_window(window, updates, every) -> None:
    phase = recipe(updates=updates, min_update_interval="1 steps", end="100%").phases[0]
    cadence = update_cadence(phase, Timeline(1, window))
    assert cadence.every == every and cadence.count() == updates


def test_a_count_of_updates_keeps_its_number_whatever_the_run_length() -> None:
    phase = recipe(updates=8, end="80%").phases[0]
    for steps_per_epoch in (1000, 2500):
        assert update_cadence(phase, Timeline(600, steps_per_epoch)).count() == 8


def test_the_floor_raises_a_close_cadence_and_says_how_to_change_it() -> None:
    shortened = recipe(epochs=30, update_every="1%", end="80%")
    timeline = Timeline(30, 45)  # 1,350 steps: "1%" would be an update every 14 steps
    cadence = update_cadence(shortened.phases[0], timeline)
    assert (cadence.asked, cadence.every) == (14, MIN_STEPS_BETWEEN_UPDATES)
    assert MIN_STEPS_BETWEEN_UPDATES == 90  # measured: docs/results.md#update-cadence
    [note] = cadence_notes(shortened, timeline)
    assert "every 14 steps" in note and f"every {MIN_STEPS_BETWEEN_UPDATES} steps" in note
    assert note.endswith("lower min_update_interval.") and "\n" not in note
    # On the 600-epoch run it was written for, the floor changes nothing and says nothing.
    assert not cadence_notes(recipe(epochs=600, update_every="1%"), Timeline(600, 2503))


def test_a_floor_lowered_below_the_measured_one_is_warned_about() -> None:
    close = recipe(update_every="5 steps", min_update_interval="1 steps")
    [note] = cadence_notes(close, Timeline(10, 20))
    assert "every 5 steps come closer than" in note and "docs/results.md" in note
    assert not cadence_notes(recipe(update_every="100 steps"), Timeline(10, 20))


def test_the_modifier_updates_at_the_resolved_cadence(model) -> None:
    from sparsekit.compiler import compile_recipe

    timeline = Timeline(10, 10)
    [modifier] = compile_recipe(recipe(epochs=10, update_every="2 steps"), model, timeline)
    assert modifier.update_every == MIN_STEPS_BETWEEN_UPDATES  # raised to the floor
    [modifier] = compile_recipe(
        recipe(epochs=10, update_every="2 steps", min_update_interval="1 steps"), model, timeline
    )
    assert modifier.update_every == 2


def test_update_every_and_updates_exclude_each_other() -> None:
    with pytest.raises(RecipeError, match="either update_every .* or updates"):
        recipe(update_every="5 steps", updates=3)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_every_shipped_recipe_can_be_shortened(path: Path, epochs: int) -> None:
    result = runner.invoke(
        app, ["recipe", "show", str(path), "--epochs", str(epochs), "--dataset-size", "1437",
              "--batch-size", "32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_warmup_asked_for_explicitly_is_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"name": "r", "training": {"epochs": 3, "schedule": {"warmup": 5}}})
    )
    with pytest.raises(RecipeError, match="longer than the run"):
        load_recipe(path)


def test_apply_and_recipe_show_print_the_note(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "training": {"epochs": 1, "batch_size": 32, "schedule": {"warmup": 0}},
                "phases": [
                    {"kind": "unstructured_dst", "sparsity": 0.5, "update_every": "2 steps"}
                ],
            }
        )
    )
    shown = runner.invoke(app, ["recipe", "show", str(path), "--dataset-size", "256"])
    assert shown.exit_code == 0 and "lower min_update_interval" in " ".join(shown.output.split())
    applied = runner.invoke(
        app, ["apply", str(path), "--model", "vit_tiny_patch16_224", "--data", "synthetic",
              "--model-arg", "depth=1", "--output", str(tmp_path / "o")],
    )  # fmt: skip
    assert applied.exit_code == 0, applied.output
    assert "note: phases[0] (unstructured_dst)" in applied.output


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("updates", "0", "phases[0].updates (line 7)"),
        ("updates", "many", "phases[0].updates (line 7)"),
        ("min_update_interval", "soon", "phases[0].min_update_interval (line 7)"),
    ],
)
def test_bad_cadence_values_get_the_line_numbered_error(
    tmp_path: Path, field: str, value: str, message: str
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\ntraining:\n  epochs: 10\nphases:\n  - kind: unstructured_dst\n"
        f"    sparsity: 0.5\n    {field}: {value}\n"
    )
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)
