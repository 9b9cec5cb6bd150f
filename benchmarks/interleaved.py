"""Time training steps of several runs interleaved step by step, so slow drift of the machine
hits every run alike. Shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def time_steps(
    runs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, object]],
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds of each timed step (forward, backward, optimizer, the session's events) per run;
    `runs` maps a name to (model, optimizer, session), `batch(step)` gives that step's data."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(warmup + steps):
        x, y = batch(step)
        for name, (model, optimizer, session) in runs.items():
            start = time.perf_counter()
            session.batch_start()
            F.cross_entropy(model(x), y).backward()
            session.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            session.after_optimizer_step()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
