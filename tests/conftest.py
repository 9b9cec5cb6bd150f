"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_vit()
