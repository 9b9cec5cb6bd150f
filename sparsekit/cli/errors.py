"""How every command reports a known error: one paragraph on stderr and a non-zero exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sparsekit.errors import SparsekitError

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so a SparsekitError or Ctrl-C never shows a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SparsekitError as err:
            stderr.print(f"[bold red]error:[/] {escape(str(err))}")
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            stderr.print(
                "interrupted. Nothing half-written is left behind; a training run continues "
                "from its last completed epoch with the same command plus --resume."
            )
            raise typer.Exit(130) from None

    return wrapper
