"""TensorBoard event files of a run (`sparsekit apply --tensorboard`), in RUN/tensorboard/.

The trainer hands over the lines it has just logged to metrics.jsonl, once the epoch's
checkpoint is written. Every scalar is placed at its optimizer step (`step` of the line): an
epoch's losses, accuracies, learning rate and sparsity at the epoch's last step, a prune/grow
update's numbers (`regrown`, `fraction`, ...) at the step it was made, a phase's first masks at
the step they start. A resumed run purges every point from its checkpoint's step on
(TensorBoard's `purge_step`: points a lost epoch logged are hidden) and logs again the lines of
metrics.jsonl at that step (the checkpoint's epoch line and an update made on its last step),
so each point is drawn once, as in a run that was never interrupted.

TensorBoard is an optional extra (`pip install 'sparsekit[tensorboard]'`); asking for it without
the package installed is an error before anything is trained, so a run never silently lacks the
logs it was asked for.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from sparsekit.errors import SparsekitError

# Tags of the epoch lines' scalars.
EPOCH_TAGS = {
    "train/loss": "train_loss",
    "train/acc": "train_acc",
    "val/loss": "val_loss",
    "val/acc": "val_acc",
    "val/ema_loss": "ema_val_loss",  # training.ema only
    "val/ema_acc": "ema_val_acc",
    "lr": "lr",
    "sparsity": "sparsity",
}
# Fields of an event line that say where it is, not what happened.
_PLACE = {"epoch", "step", "deferred_from"}


def require_tensorboard() -> None:
    """Raise a SparsekitError, saying how to install it, when TensorBoard cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise SparsekitError(
            "--tensorboard needs the tensorboard package, which is not installed here. Install "
            "it with pip install 'sparsekit[tensorboard]' (or pip install tensorboard), or train "
            "without --tensorboard (metrics.jsonl and metrics.csv are always written)."
        ) from None


class TensorBoardLog:
    """Scalars of a run's log lines, written to `folder` (None: nothing is written, e.g. without
    --tensorboard or on a rank other than 0). A context manager: closing flushes the files."""

    def __init__(
        self,
        folder: Path | None,
        resume_step: int | None = None,
        kept: list[dict[str, Any]] | None = None,
    ):
        """`resume_step`: the step of the checkpoint a run resumes from; points from it on are
        purged, and the lines of `kept` (metrics.jsonl, cut back to the checkpoint) from it on
        logged again."""
        self.writer = None
        if folder is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=resume_step)
        if resume_step is not None:
            self.log([r for r in kept or [] if r.get("step", -1) >= resume_step])

    def log(self, records: list[dict[str, Any]]) -> None:
        """The scalars of an epoch's metrics.jsonl lines, each at its step; flushed to disk."""
        if self.writer is None:
            return
        for record in records:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line's scalars by TensorBoard tag. An epoch line gives `EPOCH_TAGS`; an
    event gives its numbers as `PHASE/EVENT/FIELD` (`svite/mask_update/regrown`), or 1 at
    `PHASE/EVENT` for an event with none (`svite/mask_init`, `skipped_step`)."""
    if record.get("event") == "epoch":
        return {
            tag: float(record[key]) for tag, key in EPOCH_TAGS.items() if _number(record.get(key))
        }
    if "step" not in record:
        return {}
    prefix = "/".join(str(part) for part in (record.get("phase"), record["event"]) if part)
    numbers = {
        f"{prefix}/{key}": float(value)
        for key, value in record.items()
        if key not in _PLACE and _number(value)
    }
    return numbers or {prefix: 1.0}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
