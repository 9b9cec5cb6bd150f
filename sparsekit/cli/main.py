"""The `sparsekit` command: a thin layer that wires the library's calls together."""

from __future__ import annotations

import typer

from sparsekit.cli import apply as apply_cmd
from sparsekit.cli import bench as bench_cmd
from sparsekit.cli import evaluate as evaluate_cmd
from sparsekit.cli import export as export_cmd
from sparsekit.cli import inspect as inspect_cmd
from sparsekit.cli import recipe as recipe_cmd
from sparsekit.cli import report as report_cmd

app = typer.Typer(
    name="sparsekit",
    help="Train sparse Vision Transformers end to end (SViTE) from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("apply")(apply_cmd.apply)
app.command("export")(export_cmd.export)
app.command("inspect")(inspect_cmd.inspect)
app.command("report")(report_cmd.report)
app.command("bench")(bench_cmd.bench)
app.command("eval")(evaluate_cmd.evaluate)
app.add_typer(recipe_cmd.app, name="recipe")


def main() -> None:
    app()
