"""What does keeping the ranks' decisions identical cost? Steps with and without an update
under DistributedDataParallel, and the bytes sparsekit all-reduces per update.

Starts `--ranks` CPU processes (gloo) that train a DeiT-Small-sized model (the real width and
depth; small images keep the steps short) under DST + head/neuron prune-grow + token selection,
with an update every `--update-every` steps. sparsekit's own collectives (the gate-score
all-reduce and the mask checksum) are counted by wrapping `torch.distributed.all_reduce`;
DDP's gradient all-reduce, which dense training pays as well, goes through DDP's reducer and is
not counted.

    python benchmarks/distributed_comm.py                     # 2 ranks, deit_small, 32 px
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from sparsekit import Session, Timeline, compile_recipe, load_recipe
from sparsekit.models import ModelSpec, create_model, resolve_model_name


def recipe(every: int) -> dict:
    return {
        "name": "comm",
        "training": {"epochs": 1, "batch_size": 16, "schedule": {"warmup": 0}},
        "phases": [
            {
                "kind": "unstructured_dst",
                "sparsity": 0.5,
                "update_every": f"{every} steps",
                "min_update_interval": "1 steps",
            },
            {
                "kind": "head_prune_grow",
                "head_density": 0.5,
                "mlp_density": 0.5,
                "update_every": f"{every} steps",
                "min_update_interval": "1 steps",
            },
            {"kind": "token_select", "keep_ratio": 0.7},
        ],
    }


def worker(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rv", rank=rank, world_size=world)
    sent = {"bytes": 0, "calls": 0}
    original = dist.all_reduce

    def counting(tensor, *a, **k):
        sent["bytes"] += tensor.numel() * tensor.element_size()
        sent["calls"] += 1
        return original(tensor, *a, **k)

    dist.all_reduce = counting
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = ModelSpec(resolve_model_name(args.model), {"img_size": args.img_size, "patch_size": 8})
    model = create_model(spec)
    steps = args.steps + 2
    timeline = Timeline(1, steps)
    modifiers = compile_recipe(load_recipe(recipe(args.update_every)), model, timeline)
    wrapped = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=True)
    session = Session(model, optimizer, modifiers, timeline)
    share = 16 // world
    x = torch.randn(share, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (share,))
    plain, with_update, per_update = [], [], []
    for step in range(steps):
        before = sent["bytes"]
        start = time.perf_counter()
        session.batch_start()
        F.cross_entropy(wrapped(x), y).backward()
        session.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        updates = len(session.events)
        session.after_optimizer_step()
        elapsed = time.perf_counter() - start
        if step < 2:
            continue
        if len(session.events) > updates:
            with_update.append(elapsed)
            per_update.append(sent["bytes"] - before)
        else:
            plain.append(elapsed)
    if rank == 0:
        torch.save(
            {"plain": plain, "update": with_update, "bytes": per_update}, f"{folder}/result.pt"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--update-every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args.ranks, folder, args), nprocs=args.ranks, join=True)
        result = torch.load(f"{folder}/result.pt", weights_only=True)
    table = Table(
        title=f"{args.model} ({args.img_size} px), {args.ranks} CPU ranks (gloo) x "
        f"{args.threads} threads, update every {args.update_every} steps, torch {torch.__version__}"
    )
    for column in ("step", "count", "median s", "sparsekit bytes all-reduced"):
        table.add_column(column, justify="right")
    table.add_row(
        "without update",
        str(len(result["plain"])),
        f"{statistics.median(result['plain']):.3f}",
        "0",
    )
    table.add_row(
        "with update",
        str(len(result["update"])),
        f"{statistics.median(result['update']):.3f}",
        f"{statistics.median(result['bytes']):,.0f} per update",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
