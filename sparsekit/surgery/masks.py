"""Exact per-layer budgets and masks for unstructured sparsity.

The reference code draws each mask as a Bernoulli sample, so its sparsity is only approximate.
Here every layer gets an exact integer count of kept weights, and the counts add up to exactly
`round(density * total)`, so the global sparsity is hit to the element.
"""

from __future__ import annotations

import math

import torch


def layer_budgets(shapes: list[tuple[int, ...]], sparsity: float, distribution: str) -> list[int]:
    """Number of weights each layer keeps.

    Args:
        shapes: weight shape of each layer (out, in[, kh, kw]).
        sparsity: share of all these weights that are zero.
        distribution: `uniform` (same density everywhere) or `erk` (RigL's Erdos-Renyi-Kernel:
            density proportional to sum(shape) / prod(shape), layers that would exceed 1 kept
            dense and the scale solved again for the rest).
    """
    sizes = [math.prod(s) for s in shapes]
    total_keep = round((1.0 - sparsity) * sum(sizes))
    if distribution == "uniform":
        ideal = [(1.0 - sparsity) * n for n in sizes]
    elif distribution == "erk":
        ideal = _erk_ideal(shapes, sizes, total_keep)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; use 'erk' or 'uniform'")
    return _round_preserving_sum(ideal, sizes, total_keep)


def _erk_ideal(shapes: list[tuple[int, ...]], sizes: list[int], total_keep: int) -> list[float]:
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = total_keep - sum(sizes[i] for i in dense)
        free = [i for i in range(len(sizes)) if i not in dense]
        scale = budget / sum(raw[i] * sizes[i] for i in free)
        overflow = [i for i in free if scale * raw[i] > 1.0]
        if not overflow:
            break
        dense.update(overflow)
    return [float(sizes[i]) if i in dense else scale * raw[i] * sizes[i] for i in range(len(sizes))]


def _round_preserving_sum(ideal: list[float], caps: list[int], total: int) -> list[int]:
    """Largest-remainder rounding: each count is floor or ceil of its ideal, and they sum to total."""
    counts = [min(cap, math.floor(x)) for x, cap in zip(ideal, caps, strict=True)]
    order = sorted(range(len(ideal)), key=lambda i: ideal[i] - math.floor(ideal[i]), reverse=True)
    missing = total - sum(counts)
    for i in order:
        if missing <= 0:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            missing -= 1
    return counts


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the same shape with exactly `k` True entries at the largest scores."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        flat[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return flat.view_as(scores)


def random_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform scores from a dedicated generator, so every rank and every resume draws the same."""
    return torch.rand(shape, generator=generator)
