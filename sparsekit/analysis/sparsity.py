"""How sparse a model is: per masked layer, over all masked layers, and over all parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Counts from the masks (the budget) and from the weights (what is really zero).

    Args:
        model: the model being trained (unwrapped).
        masks: keep-masks by parameter name, as `Session.masks()` returns them.
    """
    params = dict(model.named_parameters())
    layers = {}
    masked_total = masked_kept = 0
    for name, mask in masks.items():
        kept, size = int(mask.sum()), mask.numel()
        layers[name] = {"size": size, "kept": kept, "sparsity": 1.0 - kept / size}
        masked_total += size
        masked_kept += kept
    total = sum(p.numel() for p in params.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in params.values())
    return {
        "global_sparsity": 1.0 - masked_kept / masked_total if masked_total else 0.0,
        "masked_params": masked_total,
        "masked_kept": masked_kept,
        "total_params": total,
        "nonzero_params": nonzero,
        "layers": layers,
    }


def global_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Share of masked weights that are pruned (0 when nothing is masked yet)."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def layer_sparsity(
    masks: dict[str, torch.Tensor], unit_masks: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Share pruned in each masked weight (by parameter name) and in each head or neuron group
    (by module name, e.g. `blocks.3.attn`): what the report plots per layer over time."""
    out = {}
    for name, mask in {**masks, **unit_masks}.items():
        out[name] = round(1.0 - int(mask.sum()) / mask.numel(), 6)
    return out
