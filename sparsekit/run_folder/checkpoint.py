"""The run's checkpoint: everything needed to continue bit-for-bit, written atomically; and
`checkpoint-best.pt`, a copy of the checkpoint of the epoch with the best validation accuracy
so far (the same bytes: the same format and hash).

Stored with `torch.save` but read back with `weights_only=True`, so loading a checkpoint can
never run code: it holds only tensors, numbers, strings, lists, tuples and dicts.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsekit.atomic import atomic_path
from sparsekit.errors import SparsekitError
from sparsekit.hashing import recipe_sha256, tensor_bytes, tensors_sha256
from sparsekit.run_folder.layout import BEST_CHECKPOINT_FILE, CHECKPOINT_FILE, RECIPE_FILE
from sparsekit.run_folder.records import best_epoch, read_metrics

FORMAT = 1
# What every checkpoint holds, and the type each piece must have to be used.
REQUIRED = {
    "epoch": int,
    "steps_per_epoch": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "session": dict,
    "rng": dict,
}


# What `load_state_dict` of a model, optimizer, scheduler or session raises for a state that was
# saved by another model or recipe.
STATE_MISMATCH = (KeyError, RuntimeError, ValueError, TypeError, IndexError)


def payload_sha256(payload: Any) -> str:
    """A hash of a checkpoint's whole contents (weights, optimizer and phase state, counters):
    it changes if any key, number, string or tensor (dtype, shape, value) changes."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            digest.update(f"T{obj.dtype}{tuple(obj.shape)}|".encode())
            digest.update(tensor_bytes(obj))
        elif isinstance(obj, dict):
            digest.update(f"d{len(obj)}|".encode())
            for key in sorted(obj, key=repr):
                feed(key)
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            digest.update(f"{type(obj).__name__[0]}{len(obj)}|".encode())
            for item in obj:
                feed(item)
        else:
            digest.update(f"{type(obj).__name__}:{obj!r}|".encode())

    feed(payload)
    return digest.hexdigest()


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
    payload = {"format": FORMAT, **payload}
    payload["sha256"] = payload_sha256(payload)  # detects a checkpoint changed after writing
    _write_atomic(path, lambda tmp: torch.save(payload, tmp))


def keep_as_best(folder: Path) -> None:
    """Copy the folder's checkpoint.pt to checkpoint-best.pt (atomically: a crash leaves the
    previous best whole). The same bytes, so the same format, hash and recipe hash.

    Raises:
        SparsekitError: the copy cannot be written (see `save_checkpoint`).
    """
    _write_atomic(
        folder / BEST_CHECKPOINT_FILE,
        lambda tmp: shutil.copyfile(folder / CHECKPOINT_FILE, tmp),
    )


def recover_best(folder: Path, epoch: int) -> tuple[int, float] | None:
    """On `--resume` from the checkpoint of `epoch`: the best epoch so far and its validation
    accuracy, read from metrics.jsonl (None before any). When the checkpoint's own epoch is the
    best, it is copied to checkpoint-best.pt again: a crash may have come between writing the
    checkpoint and its copy. An earlier best epoch was copied before the next epoch started.

    Raises:
        SparsekitError: metrics.jsonl is damaged, or the copy cannot be written.
    """
    best = best_epoch([r for r in read_metrics(folder) if r.get("epoch", 0) <= epoch])
    if best is not None and best[0] == epoch:
        keep_as_best(folder)
    return best


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    try:
        with atomic_path(path) as tmp:
            write(tmp)
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
    if not _hash_matches(payload):
        raise SparsekitError(
            f"{path}: its contents do not match the hash recorded when the checkpoint was "
            "written, so it was modified or damaged afterwards. Resume from a good copy, or "
            "start the run again in a new --output folder."
        )
    return payload


def require_complete(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check that a loaded checkpoint holds every piece a run continues (or exports) from,
    with the right types, so a checkpoint with a piece missing is refused by name rather than
    failing later with a KeyError.

    Raises:
        SparsekitError: a piece missing or of the wrong type, or counters out of range.
    """
    wrong = [
        f"{key} ({'missing' if key not in payload else type(payload[key]).__name__})"
        for key, kind in REQUIRED.items()
        if not isinstance(payload.get(key), kind) or isinstance(payload.get(key), bool)
    ]
    if wrong or payload["epoch"] < 0 or payload["steps_per_epoch"] < 1:
        raise SparsekitError(
            f"{path}: an incomplete or damaged checkpoint ({', '.join(wrong) or 'bad counters'}); "
            "it was not written whole by sparsekit. Resume from a good copy, or start the run "
            "again in a new --output folder."
        )
    return payload


def _hash_matches(payload: dict[str, Any]) -> bool:
    """Check (and remove) the recorded hash: of everything, or in checkpoints written before
    everything was hashed, of the model weights (`model_sha256`)."""
    if "sha256" in payload:
        return payload.pop("sha256") == payload_sha256(payload)
    if "model_sha256" in payload:
        expected = payload.pop("model_sha256")
        model = payload.get("model")
        return isinstance(model, dict) and tensors_sha256(model) == expected
    return True  # the earliest checkpoints carry no hash


def read_checkpoint(folder: Path, recipe_yaml: str, name: str = CHECKPOINT_FILE) -> dict[str, Any]:
    """The run folder's checkpoint (`name`: checkpoint.pt, or checkpoint-best.pt), complete and
    trained under `recipe_yaml` (the text of the folder's recipe.yaml), for resuming or
    exporting from.

    Raises:
        SparsekitError: see `load_checkpoint` and `require_complete`; also a recipe.yaml edited
            after the checkpoint was written.
    """
    path = folder / name
    payload = require_complete(load_checkpoint(path), path)
    check_recipe_hash(folder, recipe_yaml, payload, name)
    return payload


def check_recipe_hash(
    folder: Path, recipe_yaml: str, ckpt: dict[str, Any], name: str = CHECKPOINT_FILE
) -> None:
    """Refuse a recipe.yaml that is not the one the checkpoint was trained under.

    Checkpoints written before the hash was recorded carry none and are not checked."""
    recorded = ckpt.get("recipe_sha256")
    if recorded is None:
        return
    now = recipe_sha256(recipe_yaml)
    if now != recorded:
        raise SparsekitError(
            f"{folder}/{RECIPE_FILE} (sha256 {now[:12]}) is not the recipe "
            f"{folder}/{name} was trained under (sha256 {str(recorded)[:12]}): it was "
            "edited after training. Restore the recipe the run was trained under, or train the "
            "edited recipe in a new --output folder."
        )
