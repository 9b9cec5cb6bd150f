"""The run's checkpoint: everything needed to continue bit-for-bit, written atomically.

Stored with `torch.save` but read back with `weights_only=True`, so loading a checkpoint can
never run code: it holds only tensors, numbers, strings, lists, tuples and dicts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from sparsekit.atomic import atomic_path
from sparsekit.errors import SparsekitError
from sparsekit.export.manifest import tensors_sha256

FORMAT = 1


def capture_rng() -> dict[str, Any]:
    """Generator states that dropout, drop-path, token noise and augmentation draw from.

    On CUDA also the state of the current device's generator apart: under torchrun rank 0
    writes the checkpoint and trained on cuda:0, while rank r draws from cuda:r, whose state in
    rank 0's process was never advanced.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_current"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore `capture_rng`'s states. The current CUDA device (each rank's own under torchrun)
    takes the state of the writer's current device: the ranks' devices draw alike, so that is
    every rank's state."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        if "cuda_current" in state:  # absent in checkpoints written before it was kept
            torch.cuda.set_rng_state(state["cuda_current"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the format number) so a crash never leaves a half-written file.

    Raises:
        SparsekitError: the write failed (a full disk, most often); the previous checkpoint is
            untouched, since the new one is written beside it and renamed only when complete.
    """
    if "model" in payload:  # detects a checkpoint whose weights changed after it was written
        payload = {**payload, "model_sha256": tensors_sha256(payload["model"])}
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, **payload}, tmp)
    except (OSError, RuntimeError) as err:
        raise SparsekitError(
            f"could not write the checkpoint {path} ({err}); the previous checkpoint, if any, "
            "is intact. Free disk space (or fix the folder's permissions) and continue with "
            "--resume."
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects.

    Raises:
        SparsekitError: missing, unreadable, or from another format version.
    """
    if not path.is_file():
        raise SparsekitError(
            f"{path}: no checkpoint to resume from. Start the run without --resume."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise SparsekitError(
            f"{path}: the checkpoint cannot be read ({str(err).splitlines()[0][:200]}). It may be "
            "damaged; start the run again without --resume, in a new --output folder."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SparsekitError(
            f"{path}: not a sparsekit checkpoint of format {FORMAT}; it was written by another "
            "tool or version."
        )
    expected = payload.get("model_sha256")
    if expected is not None and tensors_sha256(payload["model"]) != expected:
        raise SparsekitError(
            f"{path}: the model weights do not match the hash recorded when the checkpoint was "
            "written, so it was modified or damaged afterwards. Resume from a good copy, or "
            "start the run again in a new --output folder."
        )
    return payload
