"""Exact per-layer budgets and masks for unstructured sparsity.

The reference code draws each mask as a Bernoulli sample, so its sparsity is only approximate.
Here every layer gets an exact integer count of kept weights, and the counts add up to exactly
`round(density * total)`, so the global sparsity is hit to the element.
"""

from __future__ import annotations

import math

import numpy as np
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
_BRACKET_ABOVE = 65_536  # smaller score tensors go straight to a full partition


def topk_mask(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Boolean mask of the same shape and device with exactly `k` True entries at the largest
    scores (the smallest with `largest=False`); ties at the cut are broken by position.

    On a GPU this is `torch.topk`. On a CPU, where top-k dominates a prune/grow update, the
    selection runs in NumPy: its comparisons and compactions are several times faster than
    torch's boolean kernels there, and they release the GIL, so layers updated on a thread pool
    really run side by side.
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    if flat.device.type != "cpu":
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat, k, largest=largest, sorted=False).indices] = True
        return mask.view(scores.shape)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # exact and order-preserving for fp16/bf16, which NumPy lacks
    return torch.from_numpy(_select(flat.numpy(), k, largest)).view(scores.shape)


def _select(a: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Exact mask of the k largest (or smallest) entries of `a`, 0 < k < a.size.

    A sample of the scores brackets the cut (the k-th value) between two sample quantiles
    [lo, hi]; everything above `hi` is in, everything below `lo` is out, and only the few scores
    strictly inside are partitioned to find the cut. Any cut is then verified: every score above
    it selected, none below, exactly k in all (ties at the cut left out by position). A bracket
    that misses (rare: a 3-sigma margin) falls back to a full partition: exact either way.
    """
    if not largest:
        a = -a
    n = a.size
    if n > _BRACKET_ABOVE:
        # Every stride-th score: free to take, and a stride coprime with 2, 3 and 5 walks
        # through all the columns of a ViT weight instead of a fixed few.
        stride = n // _SAMPLE
        while math.gcd(stride, 30) != 1:
            stride += 1
        sample = a[::stride].copy()
        size = sample.size
        q = 1.0 - k / n  # ascending rank of the cut, as a share
        margin = 3.0 * math.sqrt(max(q * (1.0 - q), 1.0 / size) / size) + 1.0 / size
        lo_index, hi_index = math.floor((q - margin) * size), math.ceil((q + margin) * size)
        sample.partition([i for i in (lo_index, hi_index) if 0 <= i < size])
        # A bracket side past the sample's end is open: the band reaches the extreme scores.
        lo = sample[lo_index] if lo_index >= 0 else -np.inf
        hi = sample[hi_index] if hi_index < size else np.inf
        # Scores tied with lo or hi stay out of the partition: many equal scores (zeros, most
        # often) would make it slow, and they can only be the cut itself.
        at_or_above_hi = int(np.count_nonzero(a >= hi))
        if at_or_above_hi >= k:
            cut = hi
        else:
            inner = a[(a > lo) & (a < hi)]
            need = k - at_or_above_hi
            cut = (
                np.partition(inner, inner.size - need)[inner.size - need]
                if need <= inner.size
                else lo
            )
        mask = a >= cut
        extra = int(np.count_nonzero(mask)) - k
        if extra == 0:
            return mask
        if extra > 0:
            ties = np.flatnonzero(a == cut)
            if ties.size >= extra:
                mask[ties[ties.size - extra :]] = False
                return mask
    mask = np.zeros(n, dtype=bool)
    mask[np.argpartition(a, n - k)[n - k :]] = True
    return mask


def random_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform scores from a dedicated generator, so every rank and every resume draws the same."""
    return torch.rand(shape, generator=generator)
