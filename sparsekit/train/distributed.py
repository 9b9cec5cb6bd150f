"""Multi-process training under torchrun: one process per device, DistributedDataParallel.

The recipe states the global batch; each of the `world` processes trains on an equal,
contiguous share of every global batch of one seeded permutation, so the ranks together see
exactly the batches a single process would, and DDP's averaged gradient is the gradient of the
global batch. Decisions (masks, heads, tokens) are identical on every rank by construction;
`Session` checks it after every update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsekit.errors import SparsekitError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, number of processes, and device index."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows progress and writes the run folder."""
        return self.rank == 0


def launched_as_main() -> bool:
    """Whether this process is rank 0 of the run torchrun describes in the environment (or a
    plain single process), known before the process group is joined."""
    return int(os.environ.get("RANK", "0")) == 0


def join(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT), or return a single-process `Ranks`. NCCL on CUDA, gloo on
    CPU; on CUDA each process takes device `cuda:LOCAL_RANK`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Add `values` up across ranks (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_from_ranks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """`tensor` of every rank, in rank order (`[tensor]` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return gathered


def share_of(batch_size: int, ranks: Ranks) -> int:
    """Per-process batch size for a global `batch_size`.

    Raises:
        SparsekitError: the global batch does not split evenly across the processes.
    """
    if batch_size % ranks.world:
        raise SparsekitError(
            f"training.batch_size {batch_size} does not split evenly across {ranks.world} "
            f"processes; the recipe states the global batch, so make it a multiple of "
            f"{ranks.world} (e.g. --batch-size {batch_size - batch_size % ranks.world or ranks.world})."
        )
    return batch_size // ranks.world
