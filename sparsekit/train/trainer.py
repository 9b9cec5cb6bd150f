"""The built-in trainer: one readable loop that a recipe's session drives.

The run folder holds `recipe.yaml` (the resolved recipe), `run.json` (model and data),
`checkpoint.pt` (last epoch), `metrics.jsonl` (one line per epoch, with per-layer sparsity, and
per prune/grow update), `summary.json` (final accuracy, sparsity and parameter counts) and, when
the recipe selects tokens, `val_samples.safetensors` (a few validation images for the report's
token map).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, Subset

from sparsekit.analysis.sparsity import global_sparsity, layer_sparsity, sparsity_report
from sparsekit.analysis.token_map import save_samples
from sparsekit.atomic import write_text_atomic
from sparsekit.compiler import compile_recipe
from sparsekit.errors import DataError, SparsekitError, UsageError, user_message
from sparsekit.models import MODEL_ARG_BOUNDS, ModelSpec, create_model, resolve_model_name
from sparsekit.modifiers.schedules import warmup_cosine_lr
from sparsekit.recipe.cadence import cadence_notes
from sparsekit.recipe.load import dump_recipe
from sparsekit.recipe.schema import Recipe, Training
from sparsekit.session import Session
from sparsekit.surgery.global_noise import GlobalBatchNoise
from sparsekit.timeline import Timeline
from sparsekit.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    require_complete,
    restore_rng,
    save_checkpoint,
)
from sparsekit.train.data import DataBundle, build_data
from sparsekit.train.distributed import (
    ShardedBatchSampler,
    join,
    launched_as_main,
    leave,
    sum_over_ranks,
)
from sparsekit.train.run_claim import claim_run_folder
from sparsekit.train.run_folder import check_recipe_hash, read_metrics, read_run_json, recipe_sha256


@dataclass
class RunConfig:
    """What `sparsekit apply` was asked to do, besides the recipe."""

    model: str
    data: str = "digits"
    output: Path | None = None
    img_size: int | None = None
    patch_size: int | None = None
    pretrained: bool = False
    checkpoint: Path | None = None
    device: str = "auto"
    workers: int = 0
    resume: bool = False
    stop_after_epoch: int | None = None
    bad_images: str = "refuse"  # image folders: refuse or skip unreadable images
    extra: dict[str, Any] = field(default_factory=dict)


def train(recipe: Recipe, run: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Train `run.model` under `recipe`; return the summary that is also written to disk.
    The process that writes the run folder (rank 0) owns it for the whole run."""
    out = run.output or Path("runs") / f"{recipe.name}-{run.model}"
    _check_run_options(run)
    _check_output(out, run.resume)
    with claim_run_folder(out) if launched_as_main() else contextlib.nullcontext():
        return _train(recipe, run, out, console or Console(stderr=True))


def _train(recipe: Recipe, run: RunConfig, out: Path, console: Console) -> dict[str, Any]:
    cfg = recipe.training
    ranks, device = join(_pick_device(run.device))
    if not ranks.main:
        console = Console(quiet=True)  # rank 0 speaks and writes for the run
    torch.manual_seed(cfg.seed)

    # Data and model.
    data = build_data(run.data, run.img_size, seed=cfg.seed, bad_images=run.bad_images)
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
    spec = model_spec(run, data, cfg.drop_path)
    model = create_model(spec, run.pretrained, run.checkpoint).to(device)
    GlobalBatchNoise(model)  # drop-path and dropout noise: any number of processes draws alike
    sampler_gen = torch.Generator()
    if ranks.world == 1:
        batches: dict[str, Any] = {
            "batch_size": cfg.batch_size,
            "sampler": RandomSampler(data.train, generator=sampler_gen),
        }
    else:
        sampler = ShardedBatchSampler(len(data.train), cfg.batch_size, ranks, sampler_gen)
        batches = {"batch_sampler": sampler}
    loader = DataLoader(
        data.train, **batches, num_workers=run.workers, pin_memory=device.type == "cuda"
    )
    val = Subset(data.val, range(ranks.rank, len(data.val), ranks.world))
    val_loader = DataLoader(val, batch_size=max(cfg.batch_size, 256), num_workers=run.workers)

    # Optimizer, schedule and the recipe's session.
    timeline = Timeline(cfg.epochs, len(loader))
    # Compile first: a phase may add parameters (token scorers) that the optimizer must train.
    modifiers = compile_recipe(recipe, model, timeline)
    for note in cadence_notes(recipe, timeline):
        console.print(f"note: {note}", highlight=False)
    optimizer = make_optimizer(model, cfg)
    warmup = timeline.steps(cfg.schedule.warmup)
    base_lr = cfg.optimizer.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
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
    session = Session(model, optimizer, modifiers, timeline)
    # The session and its modifiers work on the model itself; DDP runs forward and backward.
    trained = model
    if ranks.world > 1:
        trained = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=any(m.kind == "token_select" for m in modifiers),
        )
    amp_dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # Run folder: resume from it, or start it.
    start_epoch, elapsed = 0, 0.0
    if run.resume:
        start_epoch, elapsed = _resume(
            out, recipe, spec, model, optimizer, scheduler, scaler, session, ranks.main
        )
    elif ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "recipe.yaml", dump_recipe(recipe))
        write_text_atomic(out / "run.json", json.dumps(_run_record(spec, run, data.name), indent=2))
        write_text_atomic(out / "metrics.jsonl", "")
        if any(m.kind == "token_select" for m in modifiers):  # for the report's token map
            save_samples(out, data.val)
    last_epoch = min(cfg.epochs, run.stop_after_epoch or cfg.epochs)
    recipe_hash = recipe_sha256(dump_recipe(recipe))  # recipe.yaml's text: export checks it

    started = time.perf_counter() - elapsed
    skipped = 0  # non-finite losses skipped in a row
    with _progress(console) as progress:
        for epoch in range(start_epoch, last_epoch):
            # Train one epoch; the sampler's order depends only on (seed, epoch).
            sampler_gen.manual_seed(cfg.seed * 100_003 + epoch)
            model.train()
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="")
            loss_sum = correct = seen = 0.0
            sparsity, events_seen = 0.0, -1
            epoch_started = time.perf_counter()
            for images, labels in _batches(loader, epoch):
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                session.batch_start()
                try:
                    with torch.autocast(
                        device.type, dtype=amp_dtype, enabled=amp_dtype is not None
                    ):
                        logits = trained(images)
                        loss = criterion(logits, labels)
                except torch.cuda.OutOfMemoryError:
                    raise SparsekitError(
                        f"a batch of {len(labels)} images per process does not fit in the memory "
                        f"of {device}; give a smaller global batch (e.g. --batch-size "
                        f"{max(1, cfg.batch_size // 2)}) or a smaller --img-size."
                    ) from None
                if not all_finite(loss, device):
                    if cfg.nonfinite_loss == "stop" or skipped >= MAX_SKIPPED_IN_A_ROW:
                        streak = f", {skipped + 1} steps in a row" if skipped else ""
                        raise SparsekitError(
                            f"the loss became {loss.item()} at step {session.step} (epoch "
                            f"{epoch + 1}{streak}). Lower training.optimizer.lr or set "
                            f"training.grad_clip, then {_how_to_continue(epoch)}."
                        )
                    # Skip: no backward, no optimizer step; the phases still see the step (an
                    # update due now waits for the next step that trains).
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    session.skip_step()
                    with warnings.catch_warnings():  # "scheduler before optimizer": on purpose
                        warnings.simplefilter("ignore", UserWarning)
                        scheduler.step()
                    session.events.append({"event": "skipped_step", "step": session.step})
                    progress.update(task, advance=1)
                    continue
                skipped = 0
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                session.before_optimizer_step()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                session.after_optimizer_step()
                scheduler.step()

                loss_sum += loss.item() * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                if events_seen != len(session.events):  # sparsity only changes at updates
                    sparsity, events_seen = global_sparsity(session.masks()), len(session.events)
                progress.update(
                    task,
                    advance=1,
                    info=(
                        f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f} "
                        f"lr {scheduler.get_last_lr()[0]:.2e} sparsity {sparsity:.3f} "
                        f"[{', '.join(session.active_phases()) or 'dense'}]"
                    ),
                )
            train_time = time.perf_counter() - epoch_started
            progress.remove_task(task)
            session.epoch_end()

            # Evaluate, log, checkpoint (metrics first: resume drops lines past the checkpoint).
            # Every rank evaluates its share of the validation set; the sums are added up.
            loss_sum, correct, seen = sum_over_ranks([loss_sum, correct, seen], device)
            val_loss, val_acc = evaluate(model, _batches(val_loader, epoch), device, amp_dtype)
            metrics = {
                "epoch": epoch + 1,
                "step": session.step,
                "train_loss": loss_sum / seen if seen else math.nan,  # nan: all steps skipped
                "train_acc": correct / seen if seen else math.nan,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": scheduler.get_last_lr()[0],
                "sparsity": global_sparsity(session.masks()),
                "layer_sparsity": layer_sparsity(session.masks(), session.unit_masks()),
                "train_time_s": train_time,
                "steps_in_epoch": len(loader),
                "time_s": time.perf_counter() - started,
            }
            records = [
                *({"epoch": epoch + 1, **e} for e in session.events),
                {"event": "epoch", **metrics},
            ]
            session.events.clear()
            console.print(
                f"epoch {epoch + 1}/{cfg.epochs}  train loss {metrics['train_loss']:.3f}  "
                f"val acc {val_acc:.4f}  sparsity {metrics['sparsity']:.4f}"
            )
            checkpoint = {
                "epoch": epoch + 1,
                "steps_per_epoch": len(loader),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "session": session.state_dict(),  # on every rank: it may add up across ranks
                "rng": capture_rng(),
                "elapsed_s": metrics["time_s"],
                "recipe_sha256": recipe_hash,
            }
            if ranks.main:
                _append_metrics(out, records)
                save_checkpoint(out / "checkpoint.pt", checkpoint)

    if last_epoch < cfg.epochs:
        console.print(f"stopped after epoch {last_epoch} of {cfg.epochs}; continue with --resume.")
        leave()
        return {"stopped_at_epoch": last_epoch}
    session.finalize()
    summary = _summary(out, spec, data.name, model, session)
    if ranks.main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    console.print(summary_table(summary, out))
    leave()
    return summary


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


def _how_to_continue(epoch: int) -> str:
    """After a non-finite loss: --resume would repeat the same steps bit for bit (and must keep
    the recipe), so a changed recipe starts again."""
    if not epoch:
        return "run it again (no epoch has finished, so nothing is lost)"
    return (
        "start it again in a new --output folder (--resume continues bit for bit from the "
        f"checkpoint of epoch {epoch} under the unchanged recipe, so it would repeat these steps)"
    )


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


MAX_WORKERS = 256  # data loader processes; more is a typo, and each one is a process
MAX_SKIPPED_IN_A_ROW = 10  # with nonfinite_loss: skip, a longer streak stops the run


def all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Whether the loss is finite on every process, so that all skip a step or none does
    (a process skipping alone would leave DDP waiting for its gradients)."""
    finite = float(bool(torch.isfinite(loss)))
    if dist.is_available() and dist.is_initialized():
        return sum_over_ranks([finite], device)[0] == dist.get_world_size()
    return finite == 1.0


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over `loader` (over every rank's share of the
    data under torch.distributed)."""
    model.eval()
    loss_sum = correct = seen = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    loss_sum, correct, seen = sum_over_ranks([loss_sum, correct, seen], device)
    return loss_sum / seen, correct / seen


def summary_table(summary: dict[str, Any], out: Path) -> Table:
    """The final table printed at the end of a run."""
    table = Table(title=f"sparsekit run: {out}", show_header=False)
    sp = summary["sparsity"]
    rows = [
        ("model", summary["model"]),
        ("data", summary["data"]),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("val accuracy (final)", f"{summary['val_acc']:.4f}"),
        ("val accuracy (best)", f"{summary['best_val_acc']:.4f}"),
    ]
    if sp["masked_params"]:
        rows.append(
            (
                "sparsity of targets",
                f"{sp['global_sparsity']:.4f} ({sp['masked_kept']:,} of {sp['masked_params']:,} "
                "kept)",
            )
        )
    rows.append(("non-zero parameters", f"{sp['nonzero_params']:,} of {sp['total_params']:,}"))
    cost = summary.get("export_cost")
    if cost:
        rows.append(
            (
                "export (--compact), per image",
                f"{cost['flops'] / 1e6:,.2f} MFLOPs ({cost['flops'] / cost['dense_flops']:.3f}x "
                f"dense), {cost['params']:,} parameters ({cost['params'] / cost['dense_params']:.3f}"
                "x dense)",
            )
        )
    for kind, suffix in (("heads", ".attn"), ("MLP neurons", ".mlp")):
        units = [u for name, u in summary["units"].items() if name.endswith(suffix)]
        if units:
            kept, total = sum(u["kept"] for u in units), sum(u["total"] for u in units)
            rows.append((f"{kind} kept", f"{kept:,} of {total:,} ({kept / total:.3f})"))
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def _check_output(out: Path, resume: bool) -> None:
    # A folder with recipe.yaml but no checkpoint was stopped before its first epoch ended:
    # nothing is lost by starting it again.
    if (out / "checkpoint.pt").exists() and not resume:
        raise SparsekitError(
            f"{out} already holds a run. Continue it with --resume, or choose another --output "
            "folder (sparsekit never overwrites a run)."
        )
    if resume and not (out / "checkpoint.pt").exists():
        raise SparsekitError(
            f"--resume: {out} has no checkpoint.pt to continue from. Check --output, or start "
            "the run without --resume."
        )


def _check_run_options(run: RunConfig) -> None:
    """Options that can never work are usage errors (exit code 2), found before anything is
    built; the command line checks the same bounds, this covers callers of `train`."""
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
    if run.workers > MAX_WORKERS:
        raise UsageError(f"--workers {run.workers}: at most {MAX_WORKERS} worker processes.")
    if run.img_size and run.patch_size and run.patch_size > run.img_size:
        raise UsageError(
            f"--patch-size {run.patch_size} is larger than --img-size {run.img_size}: a ViT cuts "
            "the image into patches, so the patch must fit in it. Give a smaller --patch-size "
            "or a larger --img-size."
        )
    _pick_device(run.device)


def _pick_device(name: str) -> torch.device:
    """cpu, cuda or cuda:N (auto: cuda when there is one). Other device types (meta, mps,
    xpu) cannot run sparsekit's training: a usage error, not a failure half-way through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(
            f"--device {name!r}: sparsekit trains on auto, cpu, cuda or cuda:N (auto picks cuda "
            "when there is one); other device types are not supported."
        )
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SparsekitError(
                f"--device {name}: no CUDA device is available here; use --device cpu."
            )
        if device.index is not None and device.index >= count:
            raise SparsekitError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}."
            )
    return device


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
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)
    # The fused kernel is several times faster, and on a CPU the default one slows down badly
    # on the exact zeros that sparse training leaves in exp_avg_sq (its sqrt takes a slow path).
    try:
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas)


def _run_record(spec: ModelSpec, run: RunConfig, data_name: str) -> dict[str, Any]:
    return {"model": asdict(spec), "data": data_name, "device": run.device}


def _resume(
    out: Path,
    recipe: Recipe,
    spec: ModelSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    session: Session,
    main: bool = True,
) -> tuple[int, float]:
    """Restore every piece of state from the run folder; return (epoch to continue from,
    seconds trained so far)."""
    saved_recipe = (
        (out / "recipe.yaml").read_text(encoding="utf-8") if (out / "recipe.yaml").exists() else ""
    )
    if saved_recipe != dump_recipe(recipe):
        raise SparsekitError(
            f"--resume: {out}/recipe.yaml differs from the recipe given now (after --set and "
            "--epochs). Resume with the same recipe and options, or start a new --output folder."
        )
    saved_model = read_run_json(out).model.model_dump()
    if saved_model != asdict(spec):
        raise SparsekitError(
            f"--resume: {out} was trained with model {saved_model}, not {asdict(spec)}. Use the "
            "same --model, --data, --img-size and --patch-size."
        )
    ckpt = require_complete(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
    check_recipe_hash(out, saved_recipe, ckpt)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        session.load_state_dict(ckpt["session"])
        restore_rng(ckpt["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        raise SparsekitError(
            f"--resume: {out}/checkpoint.pt does not fit this run ({str(err).splitlines()[0][:200]}); "
            "it was written for another model or recipe. Resume with the options the run started "
            "with, or start a new --output folder."
        ) from None
    epoch = int(ckpt["epoch"])
    if ckpt["steps_per_epoch"] != session.timeline.steps_per_epoch:
        raise SparsekitError(
            f"--resume: {out}/checkpoint.pt was trained with {ckpt['steps_per_epoch']} steps per "
            f"epoch, but the data now gives {session.timeline.steps_per_epoch}: the data set "
            "changed (images added or removed, or another --data). Resume with the data the run "
            "started with, or start a new --output folder."
        )
    if main:  # every rank loads the checkpoint; only rank 0 rewrites the log
        kept = [r for r in read_metrics(out) if r.get("epoch", 0) <= epoch]
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    return epoch, float(ckpt.get("elapsed_s", 0.0))


def _append_metrics(out: Path, records: list[dict[str, Any]]) -> None:
    try:
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise SparsekitError(
            f"cannot append to {out}/metrics.jsonl ({err.strerror or err}); the checkpoint of "
            "the previous epoch is intact. Free disk space (or fix the folder) and continue "
            "with --resume."
        ) from None


def _summary(
    out: Path, spec: ModelSpec, data_name: str, model: nn.Module, session: Session
) -> dict[str, Any]:
    records = read_metrics(out)
    epochs = [r for r in records if r.get("event") == "epoch"]
    last = epochs[-1] if epochs else {}
    return {
        "model": spec.name,
        "model_kwargs": spec.kwargs,
        "data": data_name,
        "epochs": session.timeline.epochs,
        "steps": session.step,
        "val_acc": last.get("val_acc", math.nan),
        "val_loss": last.get("val_loss", math.nan),
        "best_val_acc": max((e["val_acc"] for e in epochs), default=math.nan),
        "updates": sum(1 for r in records if r.get("event") == "mask_update"),
        "time_s": last.get("time_s", 0.0),
        "sparsity": sparsity_report(model, session.masks()),
        "units": {
            name: {"kept": int(keep.sum()), "total": keep.numel()}
            for name, keep in session.unit_masks().items()
        },
        "export_cost": export_cost(spec, model, session),
    }


def export_cost(spec: ModelSpec, model: nn.Module, session: Session) -> dict[str, int]:
    """What `sparsekit export --compact` of this model will cost per image, beside dense:
    the compacted model is built in memory as the export builds it, and counted."""
    from sparsekit.analysis.cost import model_cost
    from sparsekit.export.writer import baked_model

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    masks = {k: v.cpu() for k, v in session.masks().items()}
    units = {k: v.cpu() for k, v in session.unit_masks().items()}
    compact = model_cost(baked_model(spec, state, masks, units, session.token_placements()))
    dense = model_cost(create_model(spec))
    return {
        "flops": compact.flops,
        "params": compact.params,
        "nonzero_params": compact.nonzero_params,
        "dense_flops": dense.flops,
        "dense_params": dense.params,
    }


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
