"""Pure schedule functions (no state), so resume and tests can compute any step directly."""

from __future__ import annotations

import math
from typing import Any

# The reference code's update-fraction schedule (SViTE dst_utils/core.py:37-46, main.py:346):
# `CosineDecay(death_rate, T_max=len(data_loader_train) * epochs, eta_min=0.005)`, a
# torch CosineAnnealingLR stepped once per iteration (core.py:214-220), read at each update.
REFERENCE_FRACTION_MIN = 0.005


def decayed_fraction(initial: float, progress: float, decay: str) -> float:
    """Share of active weights replaced at an update, `progress` in [0, 1] of the update window.

    cosine: initial * (1 + cos(pi * progress)) / 2, as RigL; linear: initial * (1 - progress);
    constant: initial. The reference code's schedule runs on the whole run instead of the
    window: see `update_fraction`.
    """
    progress = min(max(progress, 0.0), 1.0)
    if decay == "cosine":
        return initial * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return initial * (1.0 - progress)
    if decay == "constant":
        return initial
    if decay == "reference":
        raise ValueError(
            "fraction_decay 'reference' runs on the run's step count, not the window's progress: "
            "use update_fraction(config, count, start_step, end_step, total_steps)"
        )
    raise ValueError(f"unknown decay {decay!r}; use 'cosine', 'linear' or 'constant'")


def update_fraction(
    config: Any, count: int, start_step: int, end_step: int, total_steps: int
) -> float:
    """Share of the active units or weights replaced at the update after `count` completed
    optimizer steps, for a prune-and-grow phase `config` (`UnstructuredDSTPhase` or
    `HeadPruneGrowPhase`: its `update_fraction` f0 and `fraction_decay`).

    - cosine, linear, constant: `decayed_fraction` over the phase window, with
      progress p = (count - start_step) / (end_step - start_step) clamped to [0, 1]:
      f0 (1 + cos(pi p)) / 2, f0 (1 - p), f0.
    - reference: the SViTE code's schedule, a cosine over the whole run (not the window) from
      f0 down to 0.005, on the run's step count:
      0.005 + (f0 - 0.005) (1 + cos(pi t / total_steps)) / 2 with t = min(count, total_steps).
      This is torch's CosineAnnealingLR(T_max=total_steps, eta_min=0.005) after `count` steps
      (the reference steps it after every iteration and reads it at each update; its T_max is
      the run's iterations, len(data_loader_train) * epochs). Past T_max torch's schedule would
      rise again; the reference never updates there (updates stop at t_end = 0.8), and this
      holds it at 0.005.
    """
    initial, decay = config.update_fraction, config.fraction_decay
    if decay == "reference":
        floor = REFERENCE_FRACTION_MIN
        t = min(max(count, 0), total_steps)
        return floor + (initial - floor) * 0.5 * (1.0 + math.cos(math.pi * t / max(1, total_steps)))
    progress = (count - start_step) / max(1, end_step - start_step)
    return decayed_fraction(initial, progress, decay)


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
