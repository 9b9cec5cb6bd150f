"""What a NaN or infinite loss does to a run, as `training.nonfinite_loss` says: `stop` it with
a message naming the first such step and how to continue, or `skip` the step (at most
MAX_SKIPPED_IN_A_ROW in a row)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsekit.errors import SparsekitError
from sparsekit.train.distributed import gather_from_ranks, sum_over_ranks

MAX_SKIPPED_IN_A_ROW = 10  # with nonfinite_loss: skip, a longer streak stops the run


class NonFiniteLosses:
    """Watches the loss of every step of a run.

    `stop`: the run stops with a message naming the first such step. Its step and loss are
    kept on the device and read by `check` at logging intervals and at the end of the epoch,
    before anything of the epoch is written, so the steps in between run without waiting for
    the device, and the last checkpoint (the previous epoch's) stays as it was.

    `skip`: whether to skip a step has to be known before its backward pass, so this mode reads
    every step's loss (one CPU-GPU synchronisation per step, in this mode only).
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device = mode, device
        self.skipped = 0  # skipped in a row
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float64, device=device)

    def skips(self, loss: torch.Tensor, step: int, epoch: int) -> bool:
        """Whether to skip the step that computed `loss` (only ever under `skip`)."""
        if self.mode == "stop":
            first = ~torch.isfinite(loss.detach()) & (self.first_step < 0)
            self.first_step.masked_fill_(first, step)
            self.first_loss = torch.where(first, loss.detach().double(), self.first_loss)
            return False
        if all_finite(loss, self.device):
            self.skipped = 0
            return False
        if self.skipped >= MAX_SKIPPED_IN_A_ROW:
            self._stop(loss.item(), step, epoch)
        self.skipped += 1
        return True

    def check(self, epoch: int) -> None:
        """Under `stop`, stop the run if a loss on any process was not finite since the last
        check (every process checks at the same steps)."""
        if self.mode != "stop":
            return
        state = torch.stack([self.first_step.double(), self.first_loss])
        ranks = torch.stack(gather_from_ranks(state)).tolist()  # [step, loss] of every rank
        found = [(int(step), loss) for step, loss in ranks if step >= 0]
        if found:
            step, loss = min(found, key=lambda f: f[0])  # the first, and its lowest rank
            self._stop(loss, step, epoch)

    def _stop(self, loss: float, step: int, epoch: int) -> None:
        streak = f", {self.skipped + 1} steps in a row" if self.skipped else ""
        raise SparsekitError(
            f"the loss became {loss} at step {step} (epoch {epoch + 1}{streak}). Lower "
            "training.optimizer.lr or set training.grad_clip, then "
            f"{_how_to_continue(epoch)}."
        )


def all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Whether the loss is finite on every process, so that all skip a step or none does
    (a process skipping alone would leave DDP waiting for its gradients)."""
    finite = float(bool(torch.isfinite(loss)))
    if dist.is_available() and dist.is_initialized():
        return sum_over_ranks([finite], device)[0] == dist.get_world_size()
    return finite == 1.0


def _how_to_continue(epoch: int) -> str:
    """After a non-finite loss: --resume would repeat the same steps bit for bit (and must keep
    the recipe), so a changed recipe starts again."""
    if not epoch:
        return "run it again (no epoch has finished, so nothing is lost)"
    return (
        "start it again in a new --output folder (--resume continues bit for bit from the "
        f"checkpoint of epoch {epoch} under the unchanged recipe, so it would repeat these steps)"
    )
