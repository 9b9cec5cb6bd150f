"""How many optimizer steps a prune-and-grow update needs after it: SViTE (50%) and S2ViTE
(50%, 50%) trained with updates every N steps, everything else as in benchmarks/tradeoff.py
(digits at 16 px, a 6-block ViT, 30 epochs of 23 steps, updates replacing up to half of the
active weights or units, cosine-decayed, stopping at 80% of the run).

An update zeroes the weights it regrows and removes what the pruned ones had learnt; too close
together, the model never recovers between them. This measures where the accuracy stops
improving as updates are spaced out: that is the floor `sparsekit` warns below
(`recipe.schema.MIN_STEPS_BETWEEN_UPDATES`).

    python benchmarks/update_cadence.py                    # about 20 min on 2 cores
    python benchmarks/update_cadence.py --every 10 92 --seeds 0

Runs that finished in --out are reused. Prints one row per (method, interval): mean validation
accuracy over the seeds, and the gap to dense trained on the same seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tradeoff import recipe_for, train_in

PHASES = {
    "dense": [],
    "svite-50": [{"kind": "unstructured_dst", "sparsity": 0.5, "end": "80%"}],
    "s2vite-50-50": [
        {"kind": "head_prune_grow", "head_density": 0.5, "mlp_density": 0.5, "end": "80%"}
    ],
}


def train_one(method: str, every: int | None, seed: int, epochs: int, folder: Path) -> str:
    from sparsekit import load_recipe

    torch.set_num_threads(1)
    if (folder / "summary.json").is_file():
        return f"{folder.name}: done before"
    recipe = recipe_for("dense", epochs, seed)
    recipe["name"] = folder.name
    # The floor is what this measures: off here.
    recipe["phases"] = [
        {**phase, "update_every": f"{every} steps", "min_update_interval": "1 steps"}
        for phase in PHASES[method]
    ]
    return train_in(folder, load_recipe(recipe))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, nargs="+", default=[10, 23, 46, 92, 184])
    parser.add_argument("--methods", nargs="+", default=["svite-50", "s2vite-50-50"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/update-cadence"))
    args = parser.parse_args()
    jobs = [("dense", None, s, args.out / f"dense-s{s}") for s in args.seeds]
    jobs += [
        (m, k, s, args.out / f"{m}-every{k}-s{s}")
        for m in args.methods
        for k in args.every
        for s in args.seeds
    ]
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(train_one, m, k, s, args.epochs, f) for m, k, s, f in jobs]
        for future in futures:
            print(future.result(), flush=True)

    def acc(folder: Path) -> float:
        return json.loads((folder / "summary.json").read_text())["val_acc"]

    dense = {s: acc(args.out / f"dense-s{s}") for s in args.seeds}
    steps = json.loads((args.out / f"dense-s{args.seeds[0]}" / "summary.json").read_text())["steps"]
    print(f"\n{steps} steps per run; dense {100 * statistics.mean(dense.values()):.2f}%")
    print("| method | update every (steps) | updates | val acc % (mean) | gap to dense (points) |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        for every in args.every:
            accs = {s: acc(args.out / f"{method}-every{every}-s{s}") for s in args.seeds}
            gap = statistics.mean(100 * (accs[s] - dense[s]) for s in args.seeds)
            updates = len(range(every, int(0.8 * steps), every))
            print(
                f"| {method} | {every} | {updates} | {100 * statistics.mean(accs.values()):.2f} "
                f"| {gap:+.2f} |"
            )
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
