"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_vit()


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many hostile inputs the hardening tests tried."""
    import sys

    for module, what in (
        ("test_hostile_recipes", "hostile recipes"),
        ("test_hostile_cli", "hostile command lines and damaged run folders"),
    ):
        tried = getattr(sys.modules.get(module), "TRIED", None)
        if tried:
            parts = ", ".join(f"{n} {kind}" for kind, n in tried.items())
            terminalreporter.write_line(f"{what} tried: {sum(tried.values())} ({parts})")
    outcomes = getattr(sys.modules.get("test_hostile_cli"), "OUTCOMES", None)
    if outcomes:
        parts = ", ".join(f"{kind} {n}" for kind, n in sorted(outcomes.items()))
        terminalreporter.write_line(f"  outcomes: {parts}")
