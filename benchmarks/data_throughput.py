"""Can the data pipeline feed training? Images per second of the reference's augmentation
(RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, repeated
augmentation x3) with 0, 1, 2, ... loader workers, against images per second of training steps
(forward, backward, AdamW) of the model, measured in one run.

A PNG image folder is written from scikit-learn's digits at `--img-size` (real images, no
download); loading goes through the trainer's own loader (`make_loaders`: keyed samples,
persistent workers) and mixing (`BatchMixing`). The ratio loader / training says whether the
workers keep up: below 1 the GPU (or CPU) would wait for data.

    python benchmarks/data_throughput.py                       # deit_tiny, 224 px, batch 32
    python benchmarks/data_throughput.py --img-size 96 --workers 0 1 2 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import digits_folder  # noqa: E402

from sparsekit.models import ModelSpec, create_model, resolve_model_name  # noqa: E402
from sparsekit.recipe import load_recipe  # noqa: E402
from sparsekit.train.data import build_data  # noqa: E402
from sparsekit.train.distributed import Ranks  # noqa: E402
from sparsekit.train.epoch_order import EpochOrder  # noqa: E402
from sparsekit.train.trainer import make_loaders, make_mixing, make_optimizer  # noqa: E402
from sparsekit.train.transforms import folder_transforms  # noqa: E402

REFERENCE_DATA = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "reprob": 0.25,
    "mixup": 0.8,
    "cutmix": 1.0,
    "repeated_aug": 3,
}


def loader_rate(folder: Path, recipe, model: str, size: int, workers: int, batches: int) -> float:
    """Images per second out of the trainer's loader and mixing (after the first batch)."""
    data = build_data(
        str(folder), size, transforms=lambda s: folder_transforms(recipe.data, model, s)[:2]
    )
    batch = recipe.training.batch_size
    order = EpochOrder(len(data.train), batch, Ranks(), 0, recipe.data.repeated_aug, True)
    loader, _ = make_loaders(data, order, batch, workers, torch.device("cpu"), Ranks())
    mixing = make_mixing(recipe, data, Ranks())
    seen, started = 0, None
    for epoch in range(100):
        order.set_epoch(epoch)
        for images, labels in loader:
            images, _ = mixing(images, labels, seen)
            if started is None:
                started = time.perf_counter()  # workers started, first batch out
            else:
                seen += len(labels)
            if seen >= batches * batch:
                return seen / (time.perf_counter() - started)
    return seen / (time.perf_counter() - started)


def training_rate(model: str, size: int, batch: int, steps: int, device: str) -> float:
    """Images per second of training steps (AMP on CUDA), after two warm-up steps."""
    net = create_model(ModelSpec(model, {"img_size": size, "num_classes": 10})).to(device)
    optimizer = make_optimizer(net, load_recipe({"name": "b"}).training)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    amp = torch.bfloat16 if device.startswith("cuda") else None

    def step():
        with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12, help="batches timed per setting")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = resolve_model_name(args.model)
    recipe = load_recipe(
        {"name": "bench", "training": {"batch_size": args.batch_size}, "data": REFERENCE_DATA}
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = digits_folder(Path(tmp) / "digits", per_class=60, size=args.img_size)
        train = training_rate(model, args.img_size, args.batch_size, args.steps, args.device)
        table = Table(title=f"{model}, {args.img_size} px, batch {args.batch_size}")
        for column in ("workers", "loader img/s", "training img/s", "loader / training"):
            table.add_column(column, justify="right")
        for workers in args.workers:
            rate = loader_rate(folder, recipe, model, args.img_size, workers, args.batches)
            table.add_row(str(workers), f"{rate:,.0f}", f"{train:,.0f}", f"{rate / train:.2f}")
    Console().print(table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")


if __name__ == "__main__":
    main()
