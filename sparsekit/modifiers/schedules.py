"""Pure schedule functions (no state), so resume and tests can compute any step directly."""

from __future__ import annotations

import math


def decayed_fraction(initial: float, progress: float, decay: str) -> float:
    """Share of active weights replaced at an update, `progress` in [0, 1] of the update window.

    cosine: initial * (1 + cos(pi * progress)) / 2, as RigL and the SViTE reference; linear and
    constant for comparisons.
    """
    progress = min(max(progress, 0.0), 1.0)
    if decay == "cosine":
        return initial * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return initial * (1.0 - progress)
    if decay == "constant":
        return initial
    raise ValueError(f"unknown decay {decay!r}; use 'cosine', 'linear' or 'constant'")


def is_update_step(count: int, start: int, end: int, every: int) -> bool:
    """Whether the update falls after `count` completed optimizer steps: every `every` steps
    after `start`, strictly before `end`."""
    return start < count < end and (count - start) % every == 0


def next_update(count: int, start: int, end: int, every: int) -> int | None:
    """The first update at or after `count` completed steps, or None when none is left."""
    k = max(1, -(-(count - start) // every))
    candidate = start + k * every
    return candidate if candidate < end else None


def warmup_cosine_lr(
    step: int, total: int, warmup: int, base: float, warmup_lr: float, min_lr: float
) -> float:
    """Learning rate at `step`: linear from `warmup_lr` to `base` over `warmup` steps, then
    cosine down to `min_lr` at `total`."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
