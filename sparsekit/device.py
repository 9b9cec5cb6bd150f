"""Which torch device a command runs on, from its `--device` option."""

from __future__ import annotations

import torch

from sparsekit.errors import SparsekitError, UsageError


def pick_device(name: str) -> torch.device:
    """cpu, cuda or cuda:N (auto: cuda when there is one). Other device types (meta, mps,
    xpu) cannot run sparsekit: a usage error, not a failure half-way through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(
            f"--device {name!r}: sparsekit runs on auto, cpu, cuda or cuda:N (auto picks cuda "
            "when there is one); other device types are not supported."
        )
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SparsekitError(
                f"--device {name}: no CUDA device is available here; use --device cpu."
            )
        if device.index is not None and device.index >= count:
            raise SparsekitError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}."
            )
    return device
