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


_SAMPLE = 8192  # scores sampled to bracket the k-th largest before the exact selection


def topk_mask(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Boolean mask of the same shape with exactly `k` True entries at the largest scores
    (the smallest with `largest=False`).

    Exact, like `torch.topk`, but for large layers it first brackets the k-th largest value from
    a fixed sample, keeps everything above the bracket, and runs top-k only on the few scores
    inside it: several times faster on a CPU than a full top-k, which dominates an update.
    """
    flat = scores.flatten() if largest else -scores.flatten()
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask.view_as(scores)
    if k >= n:
        return mask.fill_(True).view_as(scores)
    if n > 8 * _SAMPLE:
        bracketed = _bracketed_topk(flat, k)
        if bracketed is not None:
            return bracketed.view_as(scores)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def _bracketed_topk(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """Exact top-k mask via a sampled bracket [lo, hi] around the k-th largest value, or None
    when the bracket misses (then the caller falls back to a full top-k)."""
    n = flat.numel()
    generator = torch.Generator(device=flat.device).manual_seed(n)
    picks = torch.randint(n, (_SAMPLE,), generator=generator, device=flat.device)
    sample = flat[picks]
    q = 1.0 - k / n  # ascending rank of the k-th largest, as a share
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / _SAMPLE) / _SAMPLE) + 2.0 / _SAMPLE
    lo_index = math.floor((q - margin) * _SAMPLE)
    hi_index = math.ceil((q + margin) * _SAMPLE)
    if lo_index < 0 or hi_index >= _SAMPLE:
        return None
    # Two order statistics of the sample: ten times faster than sorting it.
    lo = torch.kthvalue(sample, lo_index + 1).values
    hi = torch.kthvalue(sample, hi_index + 1).values
    above = flat > hi
    n_above = int(torch.count_nonzero(above))
    if n_above > k:
        return None
    band_index = ((flat >= lo) & ~above).nonzero().squeeze(1)
    if n_above + band_index.numel() < k:
        return None
    chosen = torch.topk(flat[band_index], k - n_above, sorted=False).indices
    above[band_index[chosen]] = True
    return above


def random_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform scores from a dedicated generator, so every rank and every resume draws the same."""
    return torch.rand(shape, generator=generator)
