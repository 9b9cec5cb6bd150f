"""Is the compacted export really faster? Dense vs compacted model, timed side by side.

Builds the dense model and its compacted copy (a random choice of kept heads and MLP neurons
at the given densities: which units are kept does not change the cost), checks they compute
the same function as the gated model, and with --keep adds a third model: the compacted one
with a token selector before block 0 that gathers that share of the patch tokens. It times
forward passes in eval mode, interleaved (dense, compact, ...) after a warm-up, and prints each
median time ratio next to the FLOPs ratio.

    python benchmarks/compact_speed.py                          # deit_small, 224 px, batch 8
    python benchmarks/compact_speed.py --keep 0.7               # + token selection at 70%
    python benchmarks/compact_speed.py --heads 0.5 --mlp 0.5 --batch 1 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from sparsekit.analysis.cost import model_cost
from sparsekit.models import ModelSpec, create_model, resolve_model_name
from sparsekit.surgery.compact import compact_
from sparsekit.surgery.layouts import head_groups, neuron_groups
from sparsekit.surgery.tokens import Placement, TokenSelection
from sparsekit.surgery.units import UnitGate


def random_keeps(model: torch.nn.Module, heads: float, mlp: float, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    keeps = {}
    for group in head_groups(model) + neuron_groups(model):
        density = heads if group.kind == "heads" else mlp
        keep = torch.zeros(group.units, dtype=torch.bool)
        keep[torch.randperm(group.units, generator=generator)[: round(density * group.units)]] = (
            True
        )
        keeps[group.name] = keep
    return keeps


def check_equal(model: torch.nn.Module, compact: torch.nn.Module, keeps: dict, x: torch.Tensor):
    """The gated full-size model and the compacted one give the same logits."""
    gated = copy.deepcopy(model)
    groups = {g.name: g for g in head_groups(gated) + neuron_groups(gated)}
    gates = [UnitGate(groups[name], keep) for name, keep in keeps.items()]
    with torch.no_grad():
        diff = (gated(x) - compact(x)).abs().max().item()
    for gate in gates:
        gate.remove()
    return diff


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--heads", type=float, default=0.5, help="share of heads kept")
    parser.add_argument("--mlp", type=float, default=0.5, help="share of MLP neurons kept")
    parser.add_argument("--keep", type=float, default=None, help="share of patch tokens kept")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = ModelSpec(resolve_model_name(args.model), {"img_size": args.img_size})
    dense = create_model(spec).eval()
    keeps = random_keeps(dense, args.heads, args.mlp)
    compact = compact_(copy.deepcopy(dense), keeps).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    diff = check_equal(dense, compact, keeps, x[:2])

    models = {"dense": dense, "compact": compact}
    if args.keep is not None:
        tokens = copy.deepcopy(compact)
        TokenSelection(tokens, [Placement(0, args.keep)])
        models[f"compact + tokens {args.keep:g}"] = tokens.eval()
    costs = {name: model_cost(m) for name, m in models.items()}
    models = {name: m.to(device) for name, m in models.items()}
    x = x.to(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for name, model in models.items():
                sync(device)
                start = time.perf_counter()
                model(x)
                sync(device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    table = Table(
        title=f"{spec.name} at {args.img_size} px, batch {args.batch}, heads {args.heads}, "
        f"MLP {args.mlp} ({where}, torch {torch.__version__})"
    )
    columns = (
        "model",
        "tokens",
        "ms / batch (median)",
        "time ratio",
        "FLOPs ratio",
        "time / FLOPs",
    )
    for column in (*columns, "params ratio"):
        table.add_column(column, justify="right")
    base = costs["dense"]
    for name in models:
        time_ratio = median[name] / median["dense"]
        flops = costs[name].flops / base.flops
        table.add_row(
            name,
            f"{costs[name].blocks[-1].tokens}/{base.blocks[-1].tokens}",
            f"{median[name] * 1e3:.1f}",
            f"{time_ratio:.3f}",
            f"{flops:.3f}",
            f"{time_ratio / flops:.3f}",
            f"{costs[name].params / base.params:.3f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"max |logit difference| gated vs compact: {diff:.2e}; median of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up passes"
    )


if __name__ == "__main__":
    main()
