"""The built-in trainer: one readable loop that a recipe's session drives.

Read it top to bottom: `train` claims the run folder; `build_run` makes everything a run is
made of; each epoch, `train_epoch` runs `train_step` over the loader, then `epoch_metrics`
evaluates and `save_epoch` logs and checkpoints it (keeping the best epoch's checkpoint too);
`finish` writes the summary. The run folder's files are written and read through
`sparsekit.run_folder`; `--tensorboard` adds event files (`train/tensorboard_log.py`).

The loss and accuracy sums stay on the device while an epoch trains: the device is read (one
CPU-GPU synchronisation) every LOG_EVERY steps for the progress bar, and at the end of each
epoch. The one exception is `training.nonfinite_loss: skip`, which must read every step's loss
to decide whether to take the step.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from sparsekit.analysis.sparsity import global_sparsity, layer_sparsity
from sparsekit.compiler import compile_recipe
from sparsekit.device import pick_device
from sparsekit.errors import DataError, SparsekitError, UsageError, user_message
from sparsekit.hashing import recipe_sha256, tensors_sha256
from sparsekit.init_from import (
    check_resumed_start,
    check_start_options,
    export_name,
    read_start,
    run_config,
    start_phases,
    start_record,
)
from sparsekit.models import MODEL_ARG_BOUNDS, ModelSpec, create_model, resolve_model_name
from sparsekit.modifiers import Modifier
from sparsekit.modifiers.schedules import warmup_cosine_lr
from sparsekit.recipe.cadence import cadence_notes
from sparsekit.recipe.load import dump_recipe
from sparsekit.recipe.schema import Recipe, Training
from sparsekit.run_folder.checkpoint import (
    STATE_MISMATCH,
    capture_rng,
    keep_as_best,
    read_checkpoint,
    recover_best,
    restore_rng,
    save_checkpoint,
)
from sparsekit.run_folder.claim import claim_run_folder
from sparsekit.run_folder.layout import CHECKPOINT_FILE, RECIPE_FILE, TENSORBOARD_DIR
from sparsekit.run_folder.records import (
    append_metrics,
    is_better,
    keep_metrics_through,
    read_metrics,
    read_recipe_yaml,
    read_run_json,
    start_records,
    write_summary,
)
from sparsekit.run_folder.samples import save_samples
from sparsekit.session import Session
from sparsekit.surgery.global_noise import GlobalBatchNoise
from sparsekit.timeline import Timeline
from sparsekit.train.data import build_data
from sparsekit.train.data_bundle import DataBundle
from sparsekit.train.distillation import prepare_distillation
from sparsekit.train.distributed import (
    Ranks,
    join,
    launched_as_main,
    leave,
    share_of,
    sum_over_ranks,
)
from sparsekit.train.ema import SparseEma
from sparsekit.train.epoch_order import EpochOrder
from sparsekit.train.loss import TrainingLoss, class_logits, make_loss
from sparsekit.train.mixing import BatchMixing
from sparsekit.train.nonfinite import NonFiniteLosses
from sparsekit.train.seeded_samples import SeededSamples
from sparsekit.train.summary import summarize, summary_table
from sparsekit.train.tensorboard_log import TensorBoardLog, require_tensorboard
from sparsekit.train.transforms import folder_transforms

LOG_EVERY = 20  # steps between reads of the device (progress bar, non-finite check)
MAX_WORKERS = 256  # data loader processes; more is a typo, and each one is a process


@dataclass
class RunConfig:
    """What `sparsekit apply` was asked to do, besides the recipe."""

    model: str | None = None  # None with init_from: the export's model
    data: str = "digits"
    output: Path | None = None
    img_size: int | None = None
    patch_size: int | None = None
    pretrained: bool = False
    checkpoint: Path | None = None
    init_from: Path | None = None  # a sparsekit export the run starts from (init_from.py)
    device: str = "auto"
    workers: int | None = None  # None: `loader_workers` decides (0 for in-memory data)
    resume: bool = False
    stop_after_epoch: int | None = None
    bad_images: str = "refuse"  # image folders: refuse or skip unreadable images
    tensorboard: bool = False  # also write TensorBoard event files (RUN/tensorboard/)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything one training run is made of (`build_run`), before any state is restored."""

    recipe: Recipe
    recipe_yaml: str  # recipe.yaml's text: written, compared on --resume, hashed in checkpoints
    config: RunConfig
    out: Path
    ranks: Ranks
    device: torch.device
    data: DataBundle
    spec: ModelSpec
    model: nn.Module  # what the session and its modifiers work on
    trained: nn.Module  # what runs forward and backward: the model, or DDP around it
    loader: DataLoader
    val_loader: DataLoader
    order: EpochOrder  # the training order: it depends on (seed, epoch) only
    mixing: BatchMixing | None  # mixup and cutmix (the recipe's data section), or None
    modifiers: list[Modifier]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: TrainingLoss  # loss(images, outputs, targets): train/loss.py
    session: Session
    amp_dtype: torch.dtype | None
    best: tuple[int, float] | None = None  # (epoch, val_acc) of checkpoint-best.pt, once saved
    ema: SparseEma | None = None  # training.ema: the weights' moving average (train/ema.py)
    start: dict[str, str] | None = None  # --init-from: the export's path and hash
    teacher_sha256: str | None = None  # training.distillation: the teacher's weights, hashed

    @property
    def training(self) -> Training:
        return self.recipe.training


def train(recipe: Recipe, run: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Train `run.model` under `recipe`; return the summary that is also written to disk.
    The process that writes the run folder (rank 0) owns it for the whole run."""
    named = run.model or (export_name(run.init_from) if run.init_from else None)
    out = run.output or Path("runs") / f"{recipe.name}-{named}"
    _check_run_options(run)
    _check_output(out, run.resume)
    if run.tensorboard:
        require_tensorboard()
    with claim_run_folder(out) if launched_as_main() else contextlib.nullcontext():
        return _train(recipe, run, out, console or Console(stderr=True))


def _train(recipe: Recipe, config: RunConfig, out: Path, console: Console) -> dict[str, Any]:
    ranks, device = join(pick_device(config.device))
    if not ranks.main:
        console = Console(quiet=True)  # rank 0 speaks and writes for the run
    run = build_run(recipe, config, out, ranks, device, console)
    start_epoch, elapsed = resume(run) if config.resume else start_run_folder(run)
    epochs = recipe.training.epochs
    last_epoch = min(epochs, config.stop_after_epoch or epochs)
    losses = NonFiniteLosses(recipe.training.nonfinite_loss, device)

    started = time.perf_counter() - elapsed
    with open_board(run) as board, _progress(console) as progress:
        for epoch in range(start_epoch, last_epoch):
            sums, train_time = train_epoch(run, epoch, losses, progress)
            run.session.epoch_end()
            metrics = epoch_metrics(run, epoch, sums, train_time, started)
            ema = f"  ema acc {metrics['ema_val_acc']:.4f}" if "ema_val_acc" in metrics else ""
            console.print(
                f"epoch {epoch + 1}/{epochs}  train loss {metrics['train_loss']:.3f}  "
                f"val acc {metrics['val_acc']:.4f}{ema}  sparsity {metrics['sparsity']:.4f}"
            )
            save_epoch(run, metrics, board)

    if last_epoch < epochs:
        console.print(f"stopped after epoch {last_epoch} of {epochs}; continue with --resume.")
        leave()
        return {"stopped_at_epoch": last_epoch}
    summary = finish(run)
    console.print(summary_table(summary, out))
    leave()
    return summary


def build_run(
    recipe: Recipe,
    config: RunConfig,
    out: Path,
    ranks: Ranks,
    device: torch.device,
    console: Console,
) -> Run:
    """Data, model, loaders, the recipe's phases, optimizer, schedule, session, DDP and mixed
    precision, in the order that draws the same random numbers in every run."""
    cfg = recipe.training
    start = read_start(config.init_from) if config.init_from else None  # draws no random numbers
    if start is not None:
        config = run_config(config, start)  # the export's model, image and patch size
    torch.manual_seed(cfg.seed)
    data = build_data(
        config.data,
        config.img_size,
        seed=cfg.seed,
        bad_images=config.bad_images,
        transforms=lambda size: _folder_transforms(recipe, config.model, size, console),
    )
    _say_what_was_skipped(data, console)
    spec = model_spec(config, data, cfg.drop_path)
    model = create_model(
        spec,
        config.pretrained,
        config.checkpoint,
        note=lambda line: console.print(f"note: {line}", highlight=False),
    ).to(device)
    GlobalBatchNoise(model)  # drop-path and dropout noise: any number of processes draws alike
    # training.distillation: DeiT's fixed teacher from a local file (none without it)
    teacher = prepare_distillation(
        cfg.distillation,
        model,
        data,
        device,
        note=lambda line: console.print(f"note: {line}", highlight=False),
    )
    mixing = make_mixing(recipe, data, ranks)
    order = EpochOrder(
        len(data.train),
        cfg.batch_size,
        ranks,
        cfg.seed,
        repeats=recipe.data.repeated_aug,
        drop_last=mixing is not None,  # images are mixed in pairs: no odd last batch
    )
    workers = loader_workers(config.workers, data)
    loader, val_loader = make_loaders(data, order, cfg.batch_size, workers, device, ranks)

    timeline = Timeline(cfg.epochs, len(loader))
    # Compile first: a phase may add parameters (token scorers) that the optimizer must train.
    modifiers = compile_recipe(recipe, model, timeline)
    if start is not None:  # the phases start from the export; its weights are loaded
        start_phases(modifiers, model, start, lambda line: console.print(f"note: {line}"))
    for note in cadence_notes(recipe, timeline):
        console.print(f"note: {note}", highlight=False)
    share = share_of(cfg.batch_size, ranks)
    if ranks.world > 1 and share % cfg.accumulate:
        console.print(
            f"note: training.accumulate {cfg.accumulate} does not divide each process's "
            f"{share} images: the run is sound, but its drop-path, dropout and Gumbel noise "
            "fall on other images than in a single-process run, so its decisions differ; make "
            f"batch_size a multiple of {ranks.world * cfg.accumulate} to keep them.",
            highlight=False,
        )
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, timeline)
    session = Session(model, optimizer, modifiers, timeline)
    # The session and its modifiers work on the model itself; DDP runs forward and backward.
    trained = model
    if ranks.world > 1:
        trained = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=any(m.config.adds_parameters for m in modifiers),
        )
    if cfg.compile:
        # The phases work on `model`, in place, through hooks and swapped forwards: dynamo
        # guards on them, so a change of the active sub-network compiles once more at most.
        # Random draws (Gumbel noise, dropout) from torch's own generator, as in eager mode: the
        # same numbers, and checkpoints that hold the generator resume them.
        import torch._inductor.config as inductor

        inductor.fallback_random = True
        trained = torch.compile(trained)
    amp_dtype = _amp_dtype(device)
    return Run(
        recipe=recipe,
        recipe_yaml=dump_recipe(recipe),
        config=config,
        out=out,
        ranks=ranks,
        device=device,
        data=data,
        spec=spec,
        model=model,
        trained=trained,
        loader=loader,
        val_loader=val_loader,
        order=order,
        mixing=mixing,
        modifiers=modifiers,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        criterion=make_loss(cfg, soft_targets=mixing is not None, teacher=teacher),
        session=session,
        amp_dtype=amp_dtype,
        # After DDP, which gives every rank rank 0's weights: the average starts from those.
        ema=SparseEma(cfg.ema, model, timeline) if cfg.ema else None,
        start=start_record(start) if start is not None else None,
        teacher_sha256=tensors_sha256(teacher.state_dict()) if teacher is not None else None,
    )


def train_epoch(
    run: Run, epoch: int, losses: NonFiniteLosses, progress: Progress
) -> tuple[DeviceSums, float]:
    """One pass over the training data; returns its sums and how long it trained."""
    run.order.set_epoch(epoch)
    run.model.train()
    steps = len(run.loader)
    task = progress.add_task(f"epoch {epoch + 1}/{run.training.epochs}", total=steps, info="")
    sums, line = DeviceSums(run.device), ProgressLine(run)
    started = time.perf_counter()
    for done, (images, labels) in enumerate(_batches(run.loader, epoch), 1):
        train_step(run, images, labels, sums, losses, epoch)
        logs = done % LOG_EVERY == 0 or done == steps  # the device is read here only
        if logs:
            losses.check(epoch)  # before anything of this epoch is written
        progress.update(task, advance=1, **(line.info(sums) if logs else {}))
    train_time = time.perf_counter() - started
    progress.remove_task(task)
    return sums, train_time


def train_step(
    run: Run,
    images: torch.Tensor,
    labels: torch.Tensor,
    sums: DeviceSums,
    losses: NonFiniteLosses,
    epoch: int,
) -> None:
    """One optimizer step on one batch, inside the recipe's events (or, for a non-finite loss
    under `nonfinite_loss: skip`, the step skipped)."""
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    session, optimizer, scaler = run.session, run.optimizer, run.scaler
    session.batch_start()
    targets = labels
    if run.mixing is not None:  # soft targets; accuracy stays measured on the labels
        images, targets = run.mixing(images, labels, session.step)
    if run.training.accumulate > 1:
        loss = accumulate_gradients(run, images, targets, labels, sums)
        losses.skips(loss, session.step, epoch)  # `stop` only (the recipe checks): never skips
    else:
        with _out_of_memory_said(run, len(labels)), _autocast(run):
            outputs = run.trained(images)
            loss = run.criterion(images, outputs, targets)
        if losses.skips(loss, session.step, epoch):
            skip_step(run)
            return
        scaler.scale(loss).backward()
        sums.add(loss.detach().double() * len(labels), class_logits(outputs), labels)
    scaler.unscale_(optimizer)
    session.before_optimizer_step()
    if run.training.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.training.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    session.after_optimizer_step()
    if run.ema is not None:  # after the masks are applied; a skipped step never gets here
        run.ema.update(run.model, session)
    run.scheduler.step()


def accumulate_gradients(
    run: Run,
    images: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    sums: DeviceSums,
) -> torch.Tensor:
    """Forward and backward of this process's batch in `training.accumulate` micro-batches,
    each loss weighted by its share of the batch, so the summed gradient is the whole batch's;
    DDP all-reduces once, after the last. Returns the batch's loss (on the device).

    Micro-batch k holds every count-th image from the k-th: with every process's share cut so,
    micro-batch k of all processes together is micro-batch k of one process holding the whole
    batch, in the same row order, so stochastic depth, dropout and Gumbel noise (drawn for the
    global batch's rows, `GlobalBatchNoise`) fall on the same images at any number of
    processes (when `accumulate` divides each process's share)."""
    count = run.training.accumulate
    parts = [(images[k::count], targets[k::count], labels[k::count]) for k in range(count)]
    parts = [part for part in parts if len(part[2])]
    total = torch.zeros((), device=run.device)
    for index, (x, t, y) in enumerate(parts):
        last = index == len(parts) - 1
        sync = (
            contextlib.nullcontext() if last or run.trained is run.model else run.trained.no_sync()
        )
        with sync, _out_of_memory_said(run, len(x)):
            with _autocast(run):
                outputs = run.trained(x)
                loss = run.criterion(x, outputs, t) * (len(y) / len(labels))
            run.scaler.scale(loss).backward()
        total = total + loss.detach().float()
        sums.add(loss.detach().double() * len(labels), class_logits(outputs), y)
    return total


def _autocast(run: Run) -> contextlib.AbstractContextManager:
    return torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)


@contextlib.contextmanager
def _out_of_memory_said(run: Run, images: int) -> Iterator[None]:
    """A forward or backward that does not fit in the device's memory stops the run with what
    to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, run.training.batch_size // 2)
        raise SparsekitError(
            f"a batch of {images} images per process does not fit in the memory of "
            f"{run.device}; give a smaller global batch (e.g. --batch-size {smaller}), a "
            "smaller --img-size, or split each step with training.accumulate."
        ) from None


def skip_step(run: Run) -> None:
    """No backward, no optimizer step; the phases still see the step (an update due now waits
    for the next step that trains)."""
    run.optimizer.zero_grad(set_to_none=True)
    run.session.skip_step()
    with warnings.catch_warnings():  # "scheduler before optimizer": on purpose
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    run.session.events.append({"event": "skipped_step", "step": run.session.step})


def epoch_metrics(
    run: Run, epoch: int, sums: DeviceSums, train_time: float, started: float
) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl. Every rank evaluates its share of the validation set;
    the sums are added up."""
    loss_sum, correct, seen = sum_over_ranks(sums.read(), run.device)
    val_loss, val_acc = evaluate(
        run.model, _batches(run.val_loader, epoch), run.device, run.amp_dtype
    )
    ema: dict[str, float] = {}
    if run.ema is not None:  # in the live model: its session's masks and gates apply
        with run.ema.swapped_in(run.model):
            ema_loss, ema_acc = evaluate(
                run.model, _batches(run.val_loader, epoch), run.device, run.amp_dtype
            )
        ema = {"ema_val_loss": ema_loss, "ema_val_acc": ema_acc}
    session = run.session
    return {
        "epoch": epoch + 1,
        "step": session.step,
        "train_loss": loss_sum / seen if seen else math.nan,  # nan: all steps skipped
        "train_acc": correct / seen if seen else math.nan,
        "val_loss": val_loss,
        "val_acc": val_acc,
        **ema,
        "lr": run.scheduler.get_last_lr()[0],
        "sparsity": global_sparsity(session.masks()),
        "layer_sparsity": layer_sparsity(session.masks(), session.unit_masks()),
        "train_time_s": train_time,
        "steps_in_epoch": len(run.loader),
        "time_s": time.perf_counter() - started,
    }


def save_epoch(run: Run, metrics: dict[str, Any], board: TensorBoardLog) -> None:
    """Log the epoch's events and metrics, then checkpoint it (metrics first: resume drops the
    lines past the checkpoint), copy the checkpoint to checkpoint-best.pt when its validation
    accuracy beats every earlier epoch's, and last give the lines to TensorBoard (after the
    checkpoint: its files never hold a point a resume would redo)."""
    session = run.session
    records = [
        *({"epoch": metrics["epoch"], **e} for e in session.events),
        {"event": "epoch", **metrics},
    ]
    session.events.clear()
    checkpoint = {
        "epoch": metrics["epoch"],
        "steps_per_epoch": len(run.loader),
        "model": run.model.state_dict(),
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "session": session.state_dict(),  # on every rank: it may add up across ranks
        "rng": capture_rng(),
        "elapsed_s": metrics["time_s"],
        "recipe_sha256": recipe_sha256(run.recipe_yaml),  # recipe.yaml's text: export checks it
        **({"teacher_sha256": run.teacher_sha256} if run.teacher_sha256 else {}),
    }
    best = is_better(metrics["val_acc"], run.best)
    if best:
        run.best = (metrics["epoch"], metrics["val_acc"])
    if run.ranks.main:
        append_metrics(run.out, records)
        save_checkpoint(run.out / CHECKPOINT_FILE, checkpoint)
        if best:
            keep_as_best(run.out)
        board.log(records)


def open_board(run: Run) -> TensorBoardLog:
    """The run's TensorBoard log, written by rank 0 with --tensorboard; a resumed run's starts
    again at its checkpoint's step."""
    if not (run.config.tensorboard and run.ranks.main):
        return TensorBoardLog(None)
    if not run.config.resume:
        return TensorBoardLog(run.out / TENSORBOARD_DIR)
    return TensorBoardLog(run.out / TENSORBOARD_DIR, run.session.step, read_metrics(run.out))


def finish(run: Run) -> dict[str, Any]:
    """End the recipe's phases, write the summary, and give the model back plain."""
    run.session.finalize()
    summary = summarize(run.out, run.spec, run.data.name, run.model, run.session)
    if run.ranks.main:
        write_summary(run.out, summary)
    run.session.close()
    return summary


def start_run_folder(run: Run) -> tuple[int, float]:
    """A new run's files (written by rank 0); it starts at epoch 0, with no time trained."""
    if run.ranks.main:
        start_records(
            run.out,
            run.recipe_yaml,
            run.spec,
            run.data.name,
            run.config.device,
            init_from=run.start,
        )
        if any(m.config.wants_validation_samples for m in run.modifiers):  # the token map
            save_samples(run.out, run.data.val)
    return 0, 0.0


def resume(run: Run) -> tuple[int, float]:
    """Restore every piece of state from the run folder; return (epoch to continue from,
    seconds trained so far)."""
    out = run.out
    saved_recipe = read_recipe_yaml(out)
    if saved_recipe != run.recipe_yaml:
        raise SparsekitError(
            f"--resume: {out}/{RECIPE_FILE} differs from the recipe given now (after --set and "
            "--epochs). Resume with the same recipe and options, or start a new --output folder."
        )
    saved_model = read_run_json(out).model.model_dump()
    if saved_model != asdict(run.spec):
        raise SparsekitError(
            f"--resume: {out} was trained with model {saved_model}, not {asdict(run.spec)}. Use "
            "the same --model, --data, --img-size and --patch-size."
        )
    check_resumed_start(read_run_json(out).init_from, run.start, out)
    ckpt = read_checkpoint(out, saved_recipe)
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.session.load_state_dict(ckpt["session"])
        if run.ema is not None:
            run.ema.load_state_dict(ckpt["ema"])
        restore_rng(ckpt["rng"])
    except STATE_MISMATCH as err:
        raise SparsekitError(
            f"--resume: {out}/{CHECKPOINT_FILE} does not fit this run "
            f"({str(err).splitlines()[0][:200]}); it was written for another model or recipe. "
            "Resume with the options the run started with, or start a new --output folder."
        ) from None
    if ckpt.get("teacher_sha256") != run.teacher_sha256:
        raise SparsekitError(
            f"--resume: the teacher's weights ({run.recipe.training.distillation.teacher_weights})"
            " are not those the run was trained with (their hash differs from the one in "
            f"{out}/{CHECKPOINT_FILE}). Resume with the teacher file the run started with, or "
            "start a new --output folder."
        )
    epoch = int(ckpt["epoch"])
    steps_per_epoch = run.session.timeline.steps_per_epoch
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise SparsekitError(
            f"--resume: {out}/{CHECKPOINT_FILE} was trained with {ckpt['steps_per_epoch']} steps "
            f"per epoch, but the data now gives {steps_per_epoch}: the data set changed (images "
            "added or removed, or another --data). Resume with the data the run started with, or "
            "start a new --output folder."
        )
    if run.ranks.main:  # every rank loads the checkpoint; only rank 0 rewrites the log
        keep_metrics_through(out, epoch)
        run.best = recover_best(out, epoch)
    return epoch, float(ckpt.get("elapsed_s", 0.0))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over `loader` (over every rank's share of the
    data under torch.distributed)."""
    model.eval()
    sums = DeviceSums(device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        sums.add(F.cross_entropy(logits.float(), labels, reduction="sum"), logits, labels)
    loss_sum, correct, seen = sum_over_ranks(sums.read(), device)
    return loss_sum / seen, correct / seen


class DeviceSums:
    """Summed loss and correct predictions, kept on the device batch after batch and read back
    (one CPU-GPU synchronisation) only when asked."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: `loss_sum` is its loss summed over its images."""
        self.loss += loss_sum
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def read(self) -> list[float]:
        """[loss sum, correct, seen]."""
        return [self.loss.item(), float(self.correct.item()), float(self.seen)]


class ProgressLine:
    """The text beside an epoch's progress bar: running loss and accuracy, learning rate,
    sparsity and the active phases."""

    def __init__(self, run: Run):
        self.run = run
        self.sparsity, self.events_seen = 0.0, -1

    def info(self, sums: DeviceSums) -> dict[str, str]:
        """The bar's `info` field (none before a step has trained: the last text stays)."""
        if not sums.seen:
            return {}
        session = self.run.session
        if self.events_seen != len(session.events):  # sparsity only changes at updates
            self.sparsity, self.events_seen = global_sparsity(session.masks()), len(session.events)
        loss_sum, correct, seen = sums.read()
        return {
            "info": f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f} "
            f"lr {self.run.scheduler.get_last_lr()[0]:.2e} sparsity {self.sparsity:.3f} "
            f"[{', '.join(session.active_phases()) or 'dense'}]"
        }


def make_loaders(
    data: DataBundle,
    order: EpochOrder,
    batch_size: int,
    workers: int,
    device: torch.device,
    ranks: Ranks,
) -> tuple[DataLoader, DataLoader]:
    """The training loader (`order`'s batches, each image augmented under its own key) and
    this rank's share of the validation set. Workers persist across epochs; the loader's own
    generator (for the workers' base seed, which keyed samples do not use) is private, so
    that starting workers draws nothing from torch's global one (dropout, drop-path)."""
    persist = {"persistent_workers": True} if workers else {}
    loader = DataLoader(
        SeededSamples(data.train, order.seed),
        batch_sampler=order,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
        **persist,
    )
    val = Subset(data.val, range(ranks.rank, len(data.val), ranks.world))
    val_loader = DataLoader(
        val,
        batch_size=max(batch_size, 256),
        num_workers=workers,
        generator=torch.Generator(),
        **persist,
    )
    return loader, val_loader


def loader_workers(asked: int | None, data: DataBundle) -> int:
    """`--workers`, or by default: none for data held in memory (digits, synthetic), else one
    process per core this training process can count as its own, less one for itself (at most
    8; at least 1)."""
    if asked is not None:
        return asked
    if data.in_memory:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, per_process - 1))


def make_mixing(recipe: Recipe, data: DataBundle, ranks: Ranks) -> BatchMixing | None:
    """Mixup and cutmix as the recipe's data section asks (None: off), checked first against
    the batch: images are mixed in pairs, so each process's share must be even."""
    if not recipe.data.mixes:
        return None
    share = share_of(recipe.training.batch_size, ranks)
    if share % 2:
        raise SparsekitError(
            f"data.mixup/cutmix: each of the {ranks.world} process(es) trains on "
            f"{share} images of every batch of training.batch_size {recipe.training.batch_size}, "
            "but images are mixed in pairs, so the share must be even. Make batch_size a "
            f"multiple of {2 * ranks.world}."
        )
    return BatchMixing(
        recipe.data,
        data.num_classes,
        recipe.training.label_smoothing,
        recipe.training.seed,
        first_position=ranks.rank * share,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Training, timeline: Timeline
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr`, stepped once per optimizer step."""
    warmup = timeline.steps(cfg.schedule.warmup)
    base_lr = cfg.peak_lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            warmup_cosine_lr(
                s,
                timeline.total_steps,
                warmup,
                base_lr,
                cfg.schedule.warmup_lr,
                cfg.schedule.min_lr,
            )
            / base_lr
        ),
    )


def _folder_transforms(
    recipe: Recipe, model: str, size: int, console: Console
) -> tuple[Callable, Callable]:
    """An image folder's transforms (the recipe's `data` section, the rest from the model's
    pretrained config), said in one line."""
    train_tf, val_tf, settings = folder_transforms(recipe.data, resolve_model_name(model), size)
    augment = recipe.data.auto_augment or f"colour jitter {recipe.data.color_jitter:g}"
    console.print(
        f"images: {augment}, {settings['interpolation']}, mean "
        f"{tuple(round(m, 3) for m in settings['mean'])}, std "
        f"{tuple(round(s, 3) for s in settings['std'])}, eval crop {settings['crop_pct']:g}",
        highlight=False,
    )
    return train_tf, val_tf


def _say_what_was_skipped(data: DataBundle, console: Console) -> None:
    if data.skipped:
        console.print(
            f"skipped {len(data.skipped)} unreadable images (--bad-images skip), e.g. "
            f"{data.skipped[0]}"
        )
    if data.skipped_links:
        console.print(
            f"skipped {len(data.skipped_links)} symbolic links in --data (loops, duplicates, "
            f"broken links, or links out of their split), e.g. {data.skipped_links[0]}"
        )


def _batches(loader: DataLoader, epoch: int) -> Iterator[Any]:
    """The loader's batches; an image that cannot be read (in this process or a worker) stops
    the run with the file named and how to continue from here."""
    try:
        yield from loader
    except DataError as err:
        if epoch:
            then = f"continue with --resume: the run folder's checkpoint holds epoch {epoch}"
        else:
            then = "run the same command again: no epoch has finished, so nothing is lost"
        raise DataError(f"{user_message(err)} Then {then}.") from None


def model_spec(run: RunConfig, data: DataBundle, drop_path: float) -> ModelSpec:
    """The timm model a run trains: built for the data's classes, channels and image size."""
    decided = {
        "num_classes": "the data decides it (the number of class folders)",
        "in_chans": "the data decides it (3 for image folders, 1 for digits)",
        "img_size": "use --img-size",
        "patch_size": "use --patch-size",
        "drop_path_rate": "use the recipe's training.drop_path",
    }
    for key in sorted(run.extra.keys() & decided.keys()):
        raise UsageError(f"--model-arg {key}: not a model argument to set here; {decided[key]}.")
    patch_size = run.patch_size or data.patch_size
    if patch_size and patch_size > data.img_size:
        raise UsageError(
            f"the patch size {patch_size} is larger than the image size {data.img_size} of "
            f"--data {data.name}: a ViT cuts the image into patches, so the patch must fit in it. "
            "Give a smaller --patch-size or a larger --img-size."
        )
    return ModelSpec(
        resolve_model_name(run.model),
        {
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "img_size": data.img_size,
            **({"patch_size": patch_size} if patch_size else {}),
            "drop_path_rate": drop_path,
            **run.extra,
        },
    )


def _check_output(out: Path, resume: bool) -> None:
    # A folder with recipe.yaml but no checkpoint was stopped before its first epoch ended:
    # nothing is lost by starting it again.
    if (out / CHECKPOINT_FILE).exists() and not resume:
        raise SparsekitError(
            f"{out} already holds a run. Continue it with --resume, or choose another --output "
            "folder (sparsekit never overwrites a run)."
        )
    if resume and not (out / CHECKPOINT_FILE).exists():
        raise SparsekitError(
            f"--resume: {out} has no {CHECKPOINT_FILE} to continue from. Check --output, or start "
            "the run without --resume."
        )


def _check_run_options(run: RunConfig) -> None:
    """Options that can never work are usage errors (exit code 2), found before anything is
    built; the command line checks the same bounds, this covers callers of `train`."""
    check_start_options(run)  # --model or --init-from, and what --init-from excludes
    for option, value, least in (
        ("--img-size", run.img_size, 1),
        ("--patch-size", run.patch_size, 1),
        ("--stop-after-epoch", run.stop_after_epoch, 1),
        ("--workers", run.workers, 0),
    ):
        if value is not None and (isinstance(value, bool) or value < least):
            raise UsageError(f"{option} must be {least} or more, got {value}.")
    for option, value, key in (
        ("--img-size", run.img_size, "img_size"),
        ("--patch-size", run.patch_size, "patch_size"),
    ):
        if value is not None and value > MODEL_ARG_BOUNDS[key][1]:
            raise UsageError(f"{option} {value}: at most {MODEL_ARG_BOUNDS[key][1]}.")
    if run.workers is not None and run.workers > MAX_WORKERS:
        raise UsageError(f"--workers {run.workers}: at most {MAX_WORKERS} worker processes.")
    if run.img_size and run.patch_size and run.patch_size > run.img_size:
        raise UsageError(
            f"--patch-size {run.patch_size} is larger than --img-size {run.img_size}: a ViT cuts "
            "the image into patches, so the patch must fit in it. Give a smaller --patch-size "
            "or a larger --img-size."
        )
    pick_device(run.device)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_optimizer(model: nn.Module, cfg: Training) -> torch.optim.Optimizer:
    """No weight decay on biases, norms, position embeddings and tokens (as DeiT)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt, lr = cfg.optimizer, cfg.peak_lr
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov)
    # The fused kernel is several times faster, and on a CPU the default one slows down badly
    # on the exact zeros that sparse training leaves in exp_avg_sq (its sqrt takes a slow path).
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=opt.betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=opt.betas)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    )
