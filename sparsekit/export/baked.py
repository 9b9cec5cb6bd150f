"""The model an export holds, built in memory: what `sparsekit export` writes, what the final
table of a run and `sparsekit report` and `inspect` count and time, without writing files."""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.models import ModelSpec, create_model
from sparsekit.surgery.compact import bake_
from sparsekit.surgery.tokens import Placement, TokenSelection


@torch.no_grad()
def baked_model(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None = None,
    unit_masks: dict[str, torch.Tensor] | None = None,
    placements: list[Placement] | None = None,
    compact: bool = True,
) -> nn.Module:
    """The model an export holds, in memory: a plain timm model (with its token selectors)
    carrying the trained weights, masks baked in, dropped units removed when `compact`."""
    model = create_model(spec)
    if placements:
        TokenSelection(model, placements)
    model.load_state_dict(state)
    return bake_(model, masks or {}, unit_masks or {}, compact).eval()
