"""What does SViTE's dynamic sparse training cost per step, next to dense training?

Trains the same model on the same data twice with the built-in trainer, once dense (the recipe
with its phases removed) and once under the recipe, in one process, and prints the per-step
time ratio (DST / dense, training steps only, prune/grow updates included) and both final
accuracies. With --repeats 2 the runs go dense, DST, DST, dense so slow drift of the machine
cancels out.

    python benchmarks/dst_overhead.py                       # svite_small, deit_small, digits
    python benchmarks/dst_overhead.py --epochs 5 --model deit_tiny
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from interleaved import time_steps
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from sparsekit import Session
from sparsekit.models import create_model
from sparsekit.recipe import Recipe, load_recipe
from sparsekit.run_folder.records import read_metrics
from sparsekit.train.data import build_data
from sparsekit.train.trainer import RunConfig, make_optimizer, model_spec, train

ROOT = Path(__file__).parents[1]


def dst_only(recipe: Recipe) -> Recipe:
    """The recipe with its unstructured_dst phases alone (svite_plus_small also selects tokens)."""
    return recipe.model_copy(
        update={"phases": [p for p in recipe.phases if p.kind == "unstructured_dst"]}
    )


def run_once(recipe_path: Path, overrides: list[str], args, out: Path) -> dict:
    """Train once; return the mean step time, the updates done and the final accuracy."""
    recipe = dst_only(load_recipe(recipe_path, overrides))
    config = RunConfig(model=args.model, data=args.data, output=out, device=args.device)
    summary = train(recipe, config, Console(quiet=True))
    epochs = [r for r in read_metrics(out) if r["event"] == "epoch"]
    steps = sum(e["steps_in_epoch"] for e in epochs)
    return {
        "step_s": sum(e["train_time_s"] for e in epochs) / steps,
        "val_acc": summary["val_acc"],
        "sparsity": summary["sparsity"]["global_sparsity"],
        "updates": summary["updates"],
        "steps": steps,
    }


def components(recipe_path: Path, args, repeats: int = 12) -> dict:
    """Time the two costs DST adds, on a fixed batch: masking on an ordinary step, and one
    prune/grow update (steps with an update every step minus steps with none)."""
    data = build_data(args.data)
    drop_path = load_recipe(recipe_path, [f"training.epochs={args.epochs}"]).training.drop_path
    spec = model_spec(RunConfig(model=args.model, data=args.data), data, drop_path)
    images, labels = next(iter(DataLoader(data.train, batch_size=args.batch_size)))
    runs = {}
    for name, overrides in (
        ("dense", ["phases=[]"]),
        ("masked", ["phases[0].update_every=1000000 steps", "phases[0].end=100%"]),
        ("update", ["phases[0].update_every=1 steps", "phases[0].end=100%"]),
    ):
        torch.manual_seed(0)
        model = create_model(spec)
        recipe = dst_only(load_recipe(recipe_path, [f"training.epochs={args.epochs}", *overrides]))
        optimizer = make_optimizer(model, recipe.training)  # the trainer's own optimizer
        runs[name] = (model, optimizer, Session.from_recipe(recipe, model, optimizer, 100))
    # Interleaved, so drift hits all three alike.
    times = time_steps(runs, lambda step: (images, labels), repeats)
    step = {name: statistics.median(t) for name, t in times.items()}
    return {
        "dense_s": step["dense"],
        "masked_ratio": step["masked"] / step["dense"],
        "update_s": step["update"] - step["masked"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "svite_small.yaml")
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1, choices=(1, 2))
    args = parser.parse_args()

    common = [f"training.epochs={args.epochs}", f"training.batch_size={args.batch_size}"]
    order = ["dense", "dst"] if args.repeats == 1 else ["dense", "dst", "dst", "dense"]
    results: dict[str, list[dict]] = {"dense": [], "dst": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, kind in enumerate(order):
            overrides = common + (["phases=[]"] if kind == "dense" else [])
            results[kind].append(run_once(args.recipe, overrides, args, Path(tmp) / f"{i}-{kind}"))

    dense_step = statistics.mean(r["step_s"] for r in results["dense"])
    dst_step = statistics.mean(r["step_s"] for r in results["dst"])
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    table = Table(
        title=f"{args.recipe.stem} on {args.model}, {args.data}, {args.epochs} epochs, "
        f"batch {args.batch_size} ({device})"
    )
    for column in ("run", "ms / step", "ratio to dense", "updates", "sparsity", "val acc"):
        table.add_column(column)
    for kind, step in (("dense", dense_step), ("dst", dst_step)):
        runs = results[kind]
        table.add_row(
            kind,
            f"{step * 1000:.1f}",
            f"{step / dense_step:.3f}",
            str(runs[0]["updates"]),
            f"{runs[0]['sparsity']:.3f}",
            " / ".join(f"{r['val_acc']:.4f}" for r in runs),
        )
    console = Console()
    console.print(table)
    ratio = dst_step / dense_step
    verdict = "within" if ratio <= 1.05 else "OVER"
    console.print(
        f"DST / dense time per step, averaged over this run: {ratio:.3f} "
        f"({verdict} the 1.05 target)"
    )

    # Where the extra time goes, and what it means for a run of the paper's length.
    parts = components(args.recipe, args)
    run_steps, run_updates = results["dst"][0]["steps"], results["dst"][0]["updates"]

    def projected(steps: int, updates: int) -> float:
        return parts["masked_ratio"] + updates * parts["update_s"] / (steps * parts["dense_s"])

    console.print(
        f"components (median of interleaved steps): masking makes an ordinary step "
        f"{parts['masked_ratio']:.3f}x dense; one prune/grow update costs "
        f"{parts['update_s'] * 1000:.0f} ms = {parts['update_s'] / parts['dense_s']:.2f} dense steps"
    )
    console.print(
        f"model of this run ({run_updates} updates in {run_steps} steps): "
        f"{projected(run_steps, run_updates):.3f}; the same recipe at the paper's length "
        f"(600 ImageNet epochs at batch 512 = 1,501,800 steps, {run_updates} updates): "
        f"{projected(1_501_800, run_updates):.3f}"
    )


if __name__ == "__main__":
    main()
