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

    module = sys.modules.get("test_hostile_recipes")
    tried = getattr(module, "TRIED", None)
    if tried:
        parts = ", ".join(f"{n} {kind}" for kind, n in tried.items())
        terminalreporter.write_line(f"hostile recipes tried: {sum(tried.values())} ({parts})")
