"""The README's main job against dense at the same budget, on three seeds: does sparse training
keep the accuracy on a short run?

Trains, with the main job's settings (recipes/svite_plus_digits.yaml, `--model vit_tiny_patch16_224
--img-size 16 --model-arg depth=6 --model-arg num_heads=6` on the bundled digits), each of:

- dense: the recipe with its phases removed;
- svite: its unstructured phase alone (50% sparsity);
- svite+: the recipe itself (SViTE and the token selector keeping 90% of the tokens);
- s2vite: structured prune-and-grow keeping half of the heads and MLP neurons, with the
  recipe's update cadence.

Each run is exported compacted in memory; the table gives the mean validation accuracy over the
seeds, the gap to dense paired by seed, and what the export costs (FLOPs and parameters against
dense).

    python benchmarks/main_job.py                   # 12 runs, two side by side
    python benchmarks/main_job.py --methods dense svite+ --seeds 0

Runs that finished in --out are reused.
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
import yaml
from tradeoff import IMG_SIZE, MODEL, train_in

RECIPE = Path(__file__).parents[1] / "recipes" / "svite_plus_digits.yaml"
# The model of benchmarks/tradeoff.py and update_cadence.py: 6 blocks, width 192, 6 heads of 32
# (named as the README's main job names it: without embed_dim, vit_tiny's own 192).
MODEL_ARGS = {"depth": 6, "num_heads": 6}


def phases_of(method: str, recipe: dict) -> list[dict]:
    dst, tokens = recipe["phases"]
    cadence = {k: dst[k] for k in ("updates", "update_fraction", "fraction_decay", "end")}
    return {
        "dense": [],
        "svite": [dst],
        "svite+": [dst, tokens],
        "s2vite": [{"kind": "head_prune_grow", "head_density": 0.5, "mlp_density": 0.5, **cadence}],
    }[method]


def train_one(method: str, seed: int, folder: Path, threads: int) -> str:
    from sparsekit import load_recipe

    torch.set_num_threads(threads)
    if (folder / "summary.json").is_file():
        return f"{folder.name}: done before"
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["name"] = folder.name.replace("+", "plus")
    recipe["training"]["seed"] = seed
    recipe["phases"] = phases_of(method, recipe)
    return train_in(folder, load_recipe(recipe), MODEL_ARGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dense", "svite", "svite+", "s2vite"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs trained side by side")
    parser.add_argument("--out", type=Path, default=Path("runs/main-job"))
    args = parser.parse_args()
    if "dense" not in args.methods:
        parser.error("--methods must include dense: every gap is against it")
    jobs = [(m, s, args.out / f"{m}-s{s}") for m in args.methods for s in args.seeds]
    threads = max(1, 2 // args.workers)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(train_one, m, s, f, threads) for m, s, f in jobs]
        for future in futures:
            print(future.result(), flush=True)

    def summary(method: str, seed: int) -> dict:
        return json.loads((args.out / f"{method}-s{seed}" / "summary.json").read_text())

    dense = {s: summary("dense", s)["val_acc"] for s in args.seeds}
    print(f"\nmain job: {RECIPE.name}, {MODEL} {MODEL_ARGS} at {IMG_SIZE} px, seeds {args.seeds}")
    print(
        "| method | val acc % by seed | mean | gap to dense, points (paired mean) | sparsity | "
        "export FLOPs vs dense | export params vs dense | train time s (mean) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        runs = {s: summary(method, s) for s in args.seeds}
        accs = [100 * runs[s]["val_acc"] for s in args.seeds]
        gap = statistics.mean(100 * (runs[s]["val_acc"] - dense[s]) for s in args.seeds)
        cost = runs[args.seeds[0]]["export_cost"]
        print(
            f"| {method} | {' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} "
            f"| {gap:+.2f} | {runs[args.seeds[0]]['sparsity']['global_sparsity']:.3f} "
            f"| {cost['flops'] / cost['dense_flops']:.3f} "
            f"| {cost['params'] / cost['dense_params']:.3f} "
            f"| {statistics.mean(r['time_s'] for r in runs.values()):.0f} |"
        )
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
