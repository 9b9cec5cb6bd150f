"""Accuracy against cost, at an equal training budget: dense, SViTE, S2ViTE, SViTE+ and the
one-shot magnitude-pruning baseline, each over several seeds, each exported compacted.

Every method trains the same small ViT on scikit-learn's digits for the same epochs with the same
seeds, through `sparsekit.train` (the code behind `sparsekit apply`). Each run is then exported
with `--compact` semantics, loaded back with `load_compact`, scored on its validation set (the
accuracy of the file a user would ship), and its FLOPs counted and its CPU latency timed at batch
1 and batch 64, all exports interleaved round by round (in a shuffled order) so drift hits
every method alike.

    python benchmarks/tradeoff.py                       # the full sweep (about 50 min, 2 cores)
    python benchmarks/tradeoff.py --epochs 2 --seeds 0  # a smoke run

Runs that already finished in --out are reused, so an interrupted sweep continues where it
stopped. Writes runs/, exports/, runs.csv (one row per run), methods.csv (mean and spread per
method), tradeoff.png and a `sparsekit report` of the seed-0 runs (report/).
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# The ViT: 6 blocks, width 192, 6 heads of 32, MLP 768, on digits upsampled to 16 px in 4 px
# patches (16 patch tokens + the class token). Small enough for the whole sweep on 2 cores.
MODEL = "vit_tiny_patch16_224"
MODEL_ARGS = {"depth": 6, "embed_dim": 192, "num_heads": 6}
IMG_SIZE = 16

DST = {
    "kind": "unstructured_dst",
    "update_every": "1 epochs",
    "min_update_interval": "1 steps",
    "end": "80%",
}
HEADS = {
    "kind": "head_prune_grow",
    "update_every": "1 epochs",
    "min_update_interval": "1 steps",
    "end": "80%",
}
CALM = {"update_every": "10%", "min_update_interval": "1 steps", "update_fraction": 0.2}
METHODS: dict[str, list[dict]] = {
    "dense": [],
    "svite-50": [{**DST, "sparsity": 0.5}],
    "svite-70": [{**DST, "sparsity": 0.7}],
    # (attention sparsity, MLP sparsity): heads and neurons kept are 1 - these.
    "s2vite-50-50": [{**HEADS, "head_density": 0.5, "mlp_density": 0.5}],
    "s2vite-70-70": [{**HEADS, "head_density": 0.3, "mlp_density": 0.3}],
    "svite+-50-keep90": [
        {**DST, "sparsity": 0.5},
        {"kind": "token_select", "keep_ratio": 0.9, "before_block": 0},
    ],
    # The same two phases with fewer, gentler updates (7 instead of 23, replacing 20% at
    # first instead of 50%): does the exploration cost less accuracy when it churns less?
    "svite-50-calm": [{**DST, "sparsity": 0.5, **CALM}],
    "s2vite-50-50-calm": [{**HEADS, "head_density": 0.5, "mlp_density": 0.5, **CALM}],
    # The baseline a user would otherwise pick: train dense, prune once by magnitude (same layer
    # budgets as SViTE), fine-tune with the mask fixed; same total epochs.
    "magnitude-50": [
        {"kind": "dense_warmup", "end": "50%"},
        {"kind": "magnitude_prune", "start": "50%", "sparsity": 0.5},
    ],
    "magnitude-70": [
        {"kind": "dense_warmup", "end": "50%"},
        {"kind": "magnitude_prune", "start": "50%", "sparsity": 0.7},
    ],
}


def recipe_for(method: str, epochs: int, seed: int) -> dict:
    return {
        "name": method.replace("+", "plus"),
        "training": {
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
            "schedule": {"warmup": "10%"},
            "drop_path": 0.0,
            "seed": seed,
        },
        "phases": METHODS[method],
    }


class SweepError(Exception):
    """A run folder in --out that this sweep cannot reuse."""


def train_one(method: str, seed: int, epochs: int, folder: Path) -> str:
    """One run in a worker process (one thread: two small runs side by side beat one run on
    two threads at this size)."""
    from sparsekit import load_recipe
    from sparsekit.recipe import dump_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_for(method, epochs, seed))
    saved = folder / "recipe.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != dump_recipe(recipe):
        raise SweepError(
            f"{folder} holds a run of another configuration (other --epochs, or an edited "
            "method); give a new --out, or delete that folder to train it again."
        )
    if (folder / "summary.json").is_file():
        return f"{folder.name}: done before"
    return train_in(folder, recipe)


def train_in(folder: Path, recipe, model_args: dict | None = None) -> str:
    """Train `recipe` on the digits in `folder` (continuing a run stopped there), quietly;
    its result in one line. Shared by the sweeps of this directory."""
    from rich.console import Console

    from sparsekit.train.trainer import RunConfig, train

    config = RunConfig(
        model=MODEL,
        data="digits",
        img_size=IMG_SIZE,
        output=folder,
        extra=dict(MODEL_ARGS if model_args is None else model_args),
        resume=(folder / "checkpoint.pt").is_file(),
    )
    started = time.perf_counter()
    summary = train(recipe, config, Console(quiet=True))
    return (
        f"{folder.name}: val acc {summary['val_acc']:.4f} in {time.perf_counter() - started:.0f} s"
    )


@functools.cache
def validation_set(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images and labels of a seed's split, built once for all its exports."""
    from sparsekit.train.data import build_data

    val = build_data("digits", IMG_SIZE, seed=seed).val
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.stack([val[i][1] for i in range(len(val))])
    return images, labels


@torch.inference_mode()
def accuracy(model: torch.nn.Module, seed: int) -> float:
    images, labels = validation_set(seed)
    return float((model(images).argmax(1) == labels).float().mean())


@torch.inference_mode()
def latencies(models: dict[str, torch.nn.Module], batch: int, rounds: int) -> dict[str, float]:
    """Median ms per forward pass of each model at `batch`: every round runs each model once,
    in a new (seeded) order, so no model always follows the same one."""
    x = torch.randn(batch, 1, IMG_SIZE, IMG_SIZE)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = random.Random(batch)
    for r in range(rounds + 3):
        names = list(models)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            models[name](x)
            if r >= 3:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2, help="runs trained side by side")
    parser.add_argument("--rounds", type=int, default=30, help="timed passes per export")
    parser.add_argument("--out", type=Path, default=Path("runs/tradeoff"))
    args = parser.parse_args()
    if "dense" not in args.methods:
        parser.error("--methods must include dense: every ratio is against it")
    started = time.perf_counter()

    # 1. Train every (method, seed), several side by side.
    jobs = [(m, s, args.out / "runs" / f"{m}-s{s}") for m in args.methods for s in args.seeds]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(train_one, m, s, args.epochs, folder) for m, s, folder in jobs]
        try:
            for future in futures:
                print(future.result(), flush=True)
        except SweepError as err:
            pool.shutdown(cancel_futures=True)
            parser.exit(2, f"error: {err}\n")
    train_minutes = (time.perf_counter() - started) / 60

    # 2. Export each run compacted, load the file back, score it, count its cost.
    import json

    from sparsekit.analysis.cost import model_cost
    from sparsekit.export import export_run, load_compact

    torch.set_num_threads(2)
    rows, models = [], {}
    for method, seed, folder in jobs:
        export = args.out / "exports" / folder.name
        export_run(folder, export, compact=True)
        model = load_compact(export)
        cost = model_cost(model)
        summary = json.loads((folder / "summary.json").read_text())
        rows.append(
            {
                "method": method,
                "seed": seed,
                "val_acc": accuracy(model, seed),
                "run_val_acc": summary["val_acc"],
                "best_val_acc": summary["best_val_acc"],
                "params": cost.params,
                "nonzero_params": cost.nonzero_params,
                "mflops": cost.flops / 1e6,
                "train_s": summary["time_s"],
                "export_bytes": (export / "model.safetensors").stat().st_size,
            }
        )
        models[folder.name] = model

    # 3. Latency of every export, interleaved, at batch 1 and batch 64.
    for batch in (1, 64):
        measured = latencies(models, batch, args.rounds)
        for row, (_, _, folder) in zip(rows, jobs, strict=True):
            row[f"ms_b{batch}"] = measured[folder.name]

    dense = [r for r in rows if r["method"] == "dense"]
    for row in rows:  # each export against the mean of the dense exports
        for key in ("mflops", "ms_b1", "ms_b64"):
            row[f"{key}_ratio"] = row[key] / statistics.fmean(d[key] for d in dense)

    # 4. Tables, plots and a report of the seed-0 runs.
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "runs.csv", rows)
    methods = per_method(rows, args.methods)
    write_csv(args.out / "methods.csv", methods)
    plot(methods, args.out / "tradeoff.png", len(args.seeds), args.epochs)
    from sparsekit.analysis.report import write_report

    seed0 = [folder for _, s, folder in jobs if s == args.seeds[0]]
    write_report(seed0, args.out / "report")
    print(markdown_table(methods, len(args.seeds)))
    gap = max(abs(r["val_acc"] - r["run_val_acc"]) for r in rows)
    print(f"\nlargest gap between an export's accuracy and its run's last evaluation: {gap:.4f}")
    print(
        f"\ntrained {len(jobs)} runs in {train_minutes:.1f} min; whole sweep "
        f"{(time.perf_counter() - started) / 60:.1f} min; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads for timing"
    )


def per_method(rows: list[dict], order: list[str]) -> list[dict]:
    """Mean and spread over seeds per method; cost ratios against the dense exports."""

    def mean(method: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["method"] == method)

    out = []
    for method in order:
        accs = [r["val_acc"] for r in rows if r["method"] == method]
        out.append(
            {
                "method": method,
                "seeds": len(accs),
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "acc_min": min(accs),
                "acc_max": max(accs),
                "nonzero_ratio": mean(method, "nonzero_params") / mean("dense", "nonzero_params"),
                "params_ratio": mean(method, "params") / mean("dense", "params"),
                "flops_ratio": mean(method, "mflops") / mean("dense", "mflops"),
                "latency_ratio_b1": mean(method, "ms_b1") / mean("dense", "ms_b1"),
                "latency_ratio_b64": mean(method, "ms_b64") / mean("dense", "ms_b64"),
                "mflops": mean(method, "mflops"),
                "ms_b1": mean(method, "ms_b1"),
                "ms_b64": mean(method, "ms_b64"),
                "train_time_ratio": mean(method, "train_s") / mean("dense", "train_s"),
            }
        )
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def markdown_table(methods: list[dict], seeds: int) -> str:
    lines = [
        f"| method | val acc, mean ± std over {seeds} seeds (min-max) | non-zero params | "
        "FLOPs | latency b1 | latency b64 | training time |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        lines.append(
            f"| {m['method']} | {100 * m['acc_mean']:.2f} ± {100 * m['acc_std']:.2f} "
            f"({100 * m['acc_min']:.2f}-{100 * m['acc_max']:.2f}) | {m['nonzero_ratio']:.3f} | "
            f"{m['flops_ratio']:.3f} | {m['latency_ratio_b1']:.3f} | "
            f"{m['latency_ratio_b64']:.3f} | {m['train_time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def plot(methods: list[dict], path: Path, seeds: int, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("flops_ratio", "FLOPs of the compacted export / dense"),
        ("latency_ratio_b64", "CPU latency, batch 64 / dense"),
        ("nonzero_ratio", "non-zero parameters / dense"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2), sharey=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in methods:
            ax.errorbar(
                m[key], 100 * m["acc_mean"], yerr=100 * m["acc_std"], fmt="o", capsize=3,
                label=m["method"],
            )  # fmt: skip
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel=f"val accuracy % (mean ± std, {seeds} seeds)")
    axes[-1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"digits, ViT 6x192, {epochs} epochs per run: accuracy against cost")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


if __name__ == "__main__":
    main()
