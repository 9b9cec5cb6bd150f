"""The one boundary every command goes through: an error the user can act on becomes one
paragraph on stderr and a documented exit code; anything else keeps its traceback, because it
is a bug in sparsekit to report, not something the user can fix."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sparsekit.errors import SparsekitError, UsageError, user_message

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _refuse_nul(arguments: dict[str, Any]) -> None:
    """A NUL character can be typed into an argument but no file name holds one (the OS
    refuses it with a ValueError deep inside whatever opens the file)."""
    for name, value in arguments.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str | PurePath) and "\x00" in str(item):
                option = "--" + name.rstrip("_").replace("_", "-")
                raise UsageError(
                    f"{option} {str(item)!r} holds a NUL character, which no path or name can "
                    "hold; check how the value was typed or generated."
                )


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so a SparsekitError or Ctrl-C never shows a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _refuse_nul(kwargs)
            return command(*args, **kwargs)
        except SparsekitError as err:
            stderr.print(f"[bold red]error:[/] {escape(user_message(err))}")
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            stderr.print(
                "interrupted. Nothing half-written is left behind; a training run continues "
                "from its last completed epoch with the same command plus --resume."
            )
            raise typer.Exit(130) from None

    return wrapper
