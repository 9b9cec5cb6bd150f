"""Random draws that depend on a key, not on what ran before: the same numbers in any process.

An image's augmentation is drawn under the key (seed, epoch, position in the epoch), a batch's
mixup under (seed, step): so a run draws alike with any number of data loader workers,
persistent or not, at any number of processes, and after a resume. timm's and torchvision's
transforms draw from Python's `random`, NumPy's global generator and torch's; all three are
seeded from the key inside the block and given back their state after it, so the process's own
sequence (dropout, the trainer's checkpointed state) is not disturbed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def keyed_random(*key: int) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU) generators seeded from `key` inside the block."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            random.seed(int(state[0]))
            np.random.seed(int(state[0]))
            torch.manual_seed(int(state[0]) << 32 | int(state[1]))
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
