"""`sparsekit report`: plots and one self-contained HTML page from run folders alone.

Reads each run's `metrics.jsonl` (per-epoch loss, accuracy, global and per-layer sparsity;
prune/grow events with the heads each block keeps), `summary.json`, and its last checkpoint
(compacted in memory for FLOPs and latency, and run on the saved validation images for the
token map), draws PNGs with matplotlib (Agg, no display
needed) and writes `index.html` with the images embedded, so the page can be mailed or
attached as it is.
"""

from __future__ import annotations

import base64
import contextlib
import html
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsekit.errors import SparsekitError
from sparsekit.run_folder.layout import CHECKPOINT_FILE, METRICS_FILE


@dataclass
class TokenMap:
    """Saved validation images and how many token selectors each of their patches passed."""

    images: Any  # (N, C, H, W) tensor, as the model saw them
    passed: Any  # (N, patches) tensor
    selectors: int
    grid: tuple[int, int]


@dataclass
class RunRecord:
    name: str
    epochs: list[dict[str, Any]]
    events: list[dict[str, Any]]
    summary: dict[str, Any]
    flops: float | None = None  # per image, of the compacted model (export)
    latency_ms: float | None = None  # batch 1, CPU, median of repeats
    token_map: TokenMap | None = None


def read_run(folder: Path) -> RunRecord:
    """What a run folder says about itself (a finished or an interrupted run).

    Raises:
        SparsekitError: the folder has no metrics.jsonl.
    """
    from sparsekit.run_folder.records import read_metrics, read_summary

    if not (folder / METRICS_FILE).is_file():
        raise SparsekitError(
            f"{folder} has no {METRICS_FILE}: give run folders written by `sparsekit apply`."
        )
    records = read_metrics(folder)
    summary = read_summary(folder) or {}
    run = RunRecord(
        folder.name,
        [r for r in records if r.get("event") == "epoch"],
        [r for r in records if r.get("event") != "epoch"],
        summary,
    )
    # A checkpoint this version cannot rebuild leaves the run plotted without its cost and map.
    with contextlib.suppress(SparsekitError):
        if (folder / CHECKPOINT_FILE).is_file():
            _measure(run, folder)
    return run


def _measure(run: RunRecord, folder: Path) -> None:
    """FLOPs and CPU latency (batch 1) of the run's last checkpoint, compacted in memory as
    `sparsekit export --compact` would write it, and its token map on the saved images."""
    import statistics
    import time

    import torch

    from sparsekit.analysis.cost import model_cost
    from sparsekit.analysis.token_map import selectors_passed
    from sparsekit.export.baked import baked_model
    from sparsekit.run_folder.samples import read_samples
    from sparsekit.run_folder.trained_run import open_run
    from sparsekit.surgery.geometry import patch_grid

    trained = open_run(folder)
    model = baked_model(
        trained.spec, trained.weights, trained.masks, trained.unit_masks, trained.placements
    )
    size = trained.spec.kwargs.get("img_size", 224)
    x = torch.randn(1, trained.spec.kwargs.get("in_chans", 3), size, size)
    times = []
    with torch.inference_mode():
        for i in range(12):
            start = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    run.flops, run.latency_ms = float(model_cost(model).flops), 1000 * statistics.median(times)
    images = read_samples(folder)
    if trained.placements and images is not None:
        run.token_map = TokenMap(
            images,
            selectors_passed(model, images),
            len(trained.placements),
            patch_grid(model),
        )


GENERATOR = '<meta name="generator" content="sparsekit report">'


def is_report(folder: Path) -> bool:
    """Whether `folder` holds an earlier sparsekit report and nothing else: PNGs and an
    index.html that says sparsekit wrote it."""
    names = {p.name for p in folder.iterdir()}
    if "index.html" not in names or any(
        n != "index.html" and not n.endswith(".png") for n in names
    ):
        return False
    with contextlib.suppress(OSError), open(folder / "index.html", encoding="utf-8") as f:
        return GENERATOR in f.read(4096)
    return False


def write_report(folders: list[Path], out: Path) -> list[Path]:
    """Plots and index.html for `folders` in `out`; returns the files written.

    `out` must be new, empty, or an earlier sparsekit report (whose files are replaced); it
    is locked while it is written.

    Raises:
        SparsekitError: `out` is a file or holds files sparsekit did not write, another
            process is writing it, or a run folder is not one.
    """
    import matplotlib

    from sparsekit.exclusive import locked_folder, refuse_unless_ours

    refuse_unless_ours(
        out,
        is_report,
        is_file=f"-o {out} is a file; give a folder for the report.",
        not_ours=f"-o {out} holds files that are not an earlier sparsekit report (only its "
        "index.html and PNGs are replaced); nothing in it was touched. Give -o a new or empty "
        "folder.",
    )
    matplotlib.use("Agg")
    runs = [read_run(Path(f)) for f in folders]
    busy = f"-o {out} is in use: another sparsekit report is being written there now."
    with locked_folder(
        out,
        busy,
        lambda reason: (
            f"-o {out}: cannot create the report folder ({reason}); give a folder you can write."
        ),
    ):
        return _write_files(runs, out)


def _write_files(runs: list[RunRecord], out: Path) -> list[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        images = {"curves.png": _curves(runs), "sparsity.png": _sparsity(runs)}
        if any(r.flops is not None and r.summary for r in runs):
            images["tradeoff.png"] = _tradeoff(runs)
        for run in runs:
            for kind, draw in (("layers", _layers), ("heads", _heads), ("tokens", _tokens)):
                figure = draw(run)
                if figure is not None:
                    images[f"{kind}-{run.name}.png"] = figure
        for name, figure in images.items():
            figure.savefig(tmp / name, dpi=110, bbox_inches="tight")
        (tmp / "index.html").write_text(_page(runs, tmp, list(images)), encoding="utf-8")
        for stale in out.glob("*.png"):  # an earlier report's plots of other runs
            if stale.name not in images:
                stale.unlink()
        written = []
        for name in [*images, "index.html"]:
            os.replace(tmp / name, out / name)
            written.append(out / name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _curves(runs: list[RunRecord]):
    import matplotlib.pyplot as plt

    figure, (loss, acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run in runs:
        epochs = [e["epoch"] for e in run.epochs]
        loss.plot(epochs, [e["train_loss"] for e in run.epochs], marker=".", label=run.name)
        acc.plot(epochs, [e["val_acc"] for e in run.epochs], marker=".", label=run.name)
    loss.set(title="training loss", xlabel="epoch")
    acc.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1))
    acc.legend(fontsize=8)
    plt.close(figure)
    return figure


def _sparsity(runs: list[RunRecord]):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for run in runs:
        axes.plot(
            [e["epoch"] for e in run.epochs],
            [e["sparsity"] for e in run.epochs],
            marker=".",
            label=run.name,
        )
    axes.set(title="sparsity of targeted weights", xlabel="epoch", ylim=(0, 1))
    axes.legend(fontsize=8)
    plt.close(figure)
    return figure


def _tradeoff(runs: list[RunRecord]):
    """Accuracy against FLOPs and against measured latency, one point per finished run."""
    import matplotlib.pyplot as plt

    figure, (by_flops, by_time) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run in runs:
        if run.flops is None or "val_acc" not in run.summary:
            continue
        for axes, x in ((by_flops, run.flops / 1e6), (by_time, run.latency_ms)):
            axes.scatter([x], [run.summary["val_acc"]])
            axes.annotate(run.name, (x, run.summary["val_acc"]), fontsize=8)
    by_flops.set(title="accuracy vs FLOPs (compacted)", xlabel="MFLOPs per image", ylabel="val acc")
    by_time.set(title="accuracy vs CPU latency", xlabel="ms per image (batch 1)")
    plt.close(figure)
    return figure


def _heads(run: RunRecord):
    """Which heads are alive in each block, update after update (None without head events)."""
    import matplotlib.pyplot as plt
    import numpy as np

    snapshots = [e for e in run.events if e.get("heads")]
    if not snapshots:
        return None
    blocks = sorted(snapshots[0]["heads"], key=_block_order)
    width = max(max(h, default=0) for s in snapshots for h in s["heads"].values()) + 1
    alive = np.zeros((len(blocks) * width, len(snapshots)))
    for column, snapshot in enumerate(snapshots):
        for row, block in enumerate(blocks):
            for head in snapshot["heads"].get(block, []):
                alive[row * width + head, column] = 1
    figure, axes = plt.subplots(figsize=(max(4, len(snapshots) * 0.25), 0.18 * len(alive) + 1))
    axes.imshow(alive, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    axes.set_yticks([i * width + width / 2 - 0.5 for i in range(len(blocks))], blocks, fontsize=7)
    axes.set(title=f"{run.name}: alive heads (rows) at each update (columns)", xlabel="update")
    plt.close(figure)
    return figure


def _block_order(name: str) -> list[Any]:
    """`blocks.2.attn` before `blocks.10.attn`: numbers compared as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _layers(run: RunRecord):
    """Sparsity of each masked layer and each head/neuron group, epoch after epoch (None when
    the run logs no per-layer sparsity)."""
    import matplotlib.pyplot as plt
    import numpy as np

    epochs = [e for e in run.epochs if e.get("layer_sparsity")]
    if not epochs:
        return None
    names = list(dict.fromkeys(n for e in epochs for n in e["layer_sparsity"]))
    values = np.array([[e["layer_sparsity"].get(n, np.nan) for e in epochs] for n in names])
    figure, axes = plt.subplots(figsize=(max(5, 0.2 * len(epochs) + 3), 0.16 * len(names) + 1.2))
    shown = axes.imshow(
        values, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1
    )
    axes.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=6)
    ticks = range(0, len(epochs), max(1, len(epochs) // 10))
    axes.set_xticks(list(ticks), [str(epochs[i]["epoch"]) for i in ticks], fontsize=7)
    axes.set(title=f"{run.name}: sparsity per layer", xlabel="epoch")
    figure.colorbar(shown, ax=axes, label="share pruned")
    plt.close(figure)
    return figure


def _short(name: str) -> str:
    """A row label: weights by module, head and neuron groups by what they hold."""
    if name.endswith(".weight"):
        return name[: -len(".weight")]
    return f"{name} ({'heads' if name.endswith('.attn') else 'neurons'})"


def _tokens(run: RunRecord):
    """The saved validation images with the patches each token selector dropped shaded (None
    without token selection or saved images)."""
    import matplotlib.pyplot as plt
    import numpy as np

    tokens = run.token_map
    if tokens is None:
        return None
    count = len(tokens.images)
    figure, axes = plt.subplots(1, count, figsize=(1.9 * count, 2.3), squeeze=False)
    rows, cols = tokens.grid
    for i, ax in enumerate(axes[0]):
        image = tokens.images[i].float().numpy().transpose(1, 2, 0)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        # Shade each patch by how early it was dropped: darker = dropped by an earlier selector.
        dropped = (tokens.selectors - tokens.passed[i].numpy()) / tokens.selectors
        shade = np.zeros((rows, cols, 4))
        shade[..., 0] = 0.8
        shade[..., 3] = 0.75 * dropped.reshape(rows, cols)
        height, width = image.shape[:2]
        ax.imshow(shade, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        kept = int((tokens.passed[i] == tokens.selectors).sum())
        ax.set_title(f"kept {kept}/{rows * cols}", fontsize=8)
        ax.axis("off")
    shading = (
        "shaded" if tokens.selectors == 1 else "shaded; darker: dropped by an earlier selector"
    )
    figure.suptitle(f"{run.name}: patches the token selectors drop ({shading})", fontsize=9)
    plt.close(figure)
    return figure


def _page(runs: list[RunRecord], folder: Path, images: list[str]) -> str:
    rows = []
    for run in runs:
        s = run.summary
        sparsity = s.get("sparsity", {}).get("global_sparsity")
        units = s.get("units", {})
        heads = [u for n, u in units.items() if n.endswith(".attn")]
        kept = (
            f"{sum(u['kept'] for u in heads)}/{sum(u['total'] for u in heads)}" if heads else "all"
        )
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    run.name,
                    s.get("model", "?"),
                    len(run.epochs),
                    f"{s['val_acc']:.4f}" if "val_acc" in s else "running",
                    f"{sparsity:.3f}" if sparsity is not None else "-",
                    kept,
                    f"{run.flops / 1e6:,.1f}" if run.flops is not None else "-",
                    f"{run.latency_ms:.2f}" if run.latency_ms is not None else "-",
                )
            )
            + "</tr>"
        )
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / name).read_bytes()).decode()}"><figcaption>'
        f"{html.escape(name)}</figcaption></figure>"
        for name in images
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR}"
        "<title>sparsekit report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd}img{max-width:100%}</style></head><body>"
        "<h1>sparsekit report</h1><table><tr><th>run</th><th>model</th><th>epochs</th>"
        "<th>val acc</th><th>sparsity</th><th>heads kept</th><th>MFLOPs (compacted)</th>"
        "<th>ms, batch 1, CPU</th></tr>" + "".join(rows) + "</table>" + figures + "</body></html>"
    )
