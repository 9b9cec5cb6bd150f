"""`sparsekit report RUN_DIR [RUN_DIR ...] -o report/`: plots and an HTML page of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sparsekit.cli.errors import reports_errors


@reports_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `sparsekit apply`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder.")] = Path("report"),
) -> None:
    """Curves, sparsity and alive heads of each run, in PNGs and one self-contained HTML page."""
    from sparsekit.analysis.report import write_report

    written = write_report(runs, output)
    Console().print(f"wrote {len(written)} files to {output}; open {output / 'index.html'}")
