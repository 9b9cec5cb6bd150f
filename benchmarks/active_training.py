"""Does training get cheaper as it gets sparser? Dense, masked and active training steps, timed
side by side.

Three copies of the same model train on the same batches, interleaved step by step (dense,
masked, active, dense, ...): dense (no phases), and the same sparse recipe with
`training.compute: masked` (full-size tensors times masks, like the paper's code) and `active`
(only the kept heads, neurons and tokens between updates). A step is forward, backward,
optimizer and the session's work; the window includes prune/grow updates and the full-size
grow batches before them. Prints each mode's mean time per step as a ratio to dense, next to the
FLOPs ratio of the active sub-network.

    python benchmarks/active_training.py                     # deit_small, 224 px, batch 8, (a) and (b)
    python benchmarks/active_training.py --steps 40 --update-every 20
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from interleaved import time_steps
from rich.console import Console
from rich.table import Table

from sparsekit import Session, Timeline, compile_recipe, load_recipe
from sparsekit.analysis.cost import model_cost
from sparsekit.models import ModelSpec, create_model, resolve_model_name
from sparsekit.surgery.compact import compact_
from sparsekit.surgery.tokens import Placement, TokenSelection


def recipe(mode: str, heads: float, mlp: float, keep: float | None, every: int) -> dict:
    phases = [
        {
            "kind": "head_prune_grow",
            "head_density": heads,
            "mlp_density": mlp,
            "update_every": f"{every} steps",
            "min_update_interval": "1 steps",
            "end": "100%",
        }
    ]
    if keep is not None:
        phases.append({"kind": "token_select", "keep_ratio": keep})
    return {
        "name": "bench",
        "training": {
            "epochs": 1,
            "batch_size": 8,
            "compute": "masked" if mode == "dense" else mode,
            "schedule": {"warmup": 0},
        },
        "phases": phases,
    }


def active_flops_ratio(dense: torch.nn.Module, heads: float, mlp: float, keep: float | None):
    """Forward FLOPs of the active sub-network over dense (training is about 3x both)."""
    model = copy.deepcopy(dense)
    keeps = {}
    for block_index, block in enumerate(model.blocks):
        for name, units, share in (
            ("attn", block.attn.num_heads, heads),
            ("mlp", block.mlp.fc2.in_features, mlp),
        ):
            keep_units = torch.zeros(units, dtype=torch.bool)
            keep_units[: round(share * units)] = True
            keeps[f"blocks.{block_index}.{name}"] = keep_units
    compact_(model, keeps)
    if keep is not None:
        TokenSelection(model, [Placement(0, keep)])
    return model_cost(model).flops / model_cost(dense).flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--heads", type=float, default=0.5)
    parser.add_argument("--mlp", type=float, default=0.5)
    parser.add_argument("--keep", type=float, nargs="*", default=[None, 0.7])
    args = parser.parse_args()

    spec = ModelSpec(resolve_model_name(args.model), {"img_size": args.img_size})
    torch.manual_seed(0)
    base = create_model(spec)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator),
            torch.randint(0, base.num_classes, (args.batch,), generator=generator),
        )
        for _ in range(4)
    ]
    console = Console(width=120)
    table = Table(
        title=f"{spec.name} at {args.img_size} px, batch {args.batch}, {args.steps} steps, "
        f"update every {args.update_every} (CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__})"
    )
    for column in ("setting", "mode", "s / step", "time ratio", "active FLOPs ratio"):
        table.add_column(column, justify="right")
    for keep in args.keep:
        runs = {}
        for mode in ("dense", "masked", "active"):
            model = copy.deepcopy(base).train()
            timeline = Timeline(1, args.steps + 2)
            r = recipe(mode, args.heads, args.mlp, keep, args.update_every)
            if mode == "dense":
                r["phases"] = []
            modifiers = compile_recipe(load_recipe(r), model, timeline)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=5e-4, weight_decay=0.05, fused=True
            )
            runs[mode] = (model, optimizer, Session(model, optimizer, modifiers, timeline))
        times = time_steps(runs, lambda step: batches[step % len(batches)], args.steps)
        flops = active_flops_ratio(base, args.heads, args.mlp, keep)
        setting = f"heads {args.heads:g} + MLP {args.mlp:g}" + (
            f" + tokens {keep:g}" if keep else ""
        )
        dense_step = statistics.mean(times["dense"])
        for mode in runs:
            mean = statistics.mean(times[mode])
            table.add_row(
                setting,
                mode,
                f"{mean:.3f}",
                f"{mean / dense_step:.3f}",
                f"{flops:.3f}" if mode == "active" else "",
            )
        table.add_section()
    console.print(table)


if __name__ == "__main__":
    main()
