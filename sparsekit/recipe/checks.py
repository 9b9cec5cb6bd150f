"""Rules that span several fields of a recipe (windows, overlaps), checked after the schema.

Each rule returns `(field path, message)` pairs so the loader can point at the YAML line.
Spans given in steps can only be compared once the dataset size is known; the compiler checks
those again in steps.
"""

from __future__ import annotations

from sparsekit.recipe.phases import PHASES
from sparsekit.recipe.schema import Recipe
from sparsekit.recipe.span import Span

Problem = tuple[tuple[str | int, ...], str]
MAX_LR = 10.0  # the bound of training.optimizer.lr, which the scaled rate keeps too


def check_recipe(recipe: Recipe) -> list[Problem]:
    """All cross-field problems of a schema-valid recipe; empty when it is sound."""
    return [*_check_windows(recipe), *_check_overlaps(recipe), *_check_schedule(recipe)]


def _comparable(a: Span, b: Span, epochs: int) -> tuple[float, float] | None:
    """Both spans in one unit (epochs, or steps when both are steps), else None."""
    if a.unit == "steps" and b.unit == "steps":
        return a.value, b.value
    ea, eb = a.in_epochs(epochs), b.in_epochs(epochs)
    return None if ea is None or eb is None else (ea, eb)


def _check_windows(recipe: Recipe) -> list[Problem]:
    epochs = recipe.training.epochs
    problems: list[Problem] = []
    for i, phase in enumerate(recipe.phases):
        for field in ("start", "end"):
            if field not in type(phase).model_fields:
                continue  # magnitude_prune has no end
            span: Span = getattr(phase, field)
            value = span.in_epochs(epochs)
            if value is not None and value > epochs + 1e-9:
                problems.append(
                    (
                        ("phases", i, field),
                        f"{field} is {span} but the run has {epochs} epochs; "
                        "give it as a share of the run (e.g. '80%') so it follows --epochs",
                    )
                )
        pair = _comparable(phase.start, phase.end, epochs)
        if pair is not None and pair[1] <= pair[0]:
            problems.append(
                (("phases", i, "end"), f"end ({phase.end}) must come after start ({phase.start})")
                if "end" in type(phase).model_fields
                else (
                    ("phases", i, "start"),
                    f"start ({phase.start}) must come before the run ends",
                )
            )
        if phase.scheduled_updates and phase.update_every is not None:
            if phase.update_every.value == 0:
                problems.append(
                    (("phases", i, "update_every"), "update_every must be greater than 0")
                )
            if phase.updates is not None:
                problems.append(
                    (
                        ("phases", i, "updates"),
                        "give either update_every (time between updates) or updates (their "
                        "number over the window), not both",
                    )
                )
    return problems


def _check_overlaps(recipe: Recipe) -> list[Problem]:
    """Dense warm-up must precede sparsity; two weight-masking phases must not own the same
    weights, and two head phases would gate the same blocks."""
    epochs = recipe.training.epochs
    problems: list[Problem] = []
    dst = [(i, p) for i, p in enumerate(recipe.phases) if p.masks_weights]
    for kind in PHASES:
        if kind.at_most_once is None:
            continue
        same = [i for i, p in enumerate(recipe.phases) if type(p) is kind]
        problems += [
            (
                ("phases", j, "kind"),
                f"phases[{same[0]}] and phases[{j}] are both {kind.kind_name()}; "
                f"{kind.at_most_once}",
            )
            for j in same[1:]
        ]
    sparse = [(i, p) for i, p in enumerate(recipe.phases) if p.lasts_to_end]
    warmups = [(i, p) for i, p in enumerate(recipe.phases) if p.dense_window]
    for i, phase in sparse:
        for j, warm in warmups:
            pair = _comparable(phase.start, warm.end, epochs)
            if pair is not None and pair[0] < pair[1] - 1e-9:
                problems.append(
                    (
                        ("phases", i, "start"),
                        f"starts at {phase.start}, inside the dense warm-up phases[{j}] that ends "
                        f"at {warm.end}; masks last until the run ends, so set start: {warm.end.to_yaml()!r}",
                    )
                )
    for a in range(len(dst)):
        for b in range(a + 1, len(dst)):
            (i, p), (j, q) = dst[a], dst[b]
            shared = sorted(set(p.targets.roles) & set(q.targets.roles))
            patterns = (
                p.targets.include or p.targets.exclude or q.targets.include or q.targets.exclude
            )
            if shared and not patterns:
                problems.append(
                    (
                        ("phases", j, "targets", "roles"),
                        f"phases[{i}] ({p.kind}) and phases[{j}] ({q.kind}) both make roles "
                        f"{shared} sparse; masks last until the run ends, so they would act on "
                        "the same weights at once: merge them, or split the weights with "
                        "targets.include/exclude",
                    )
                )
    return problems


def _check_schedule(recipe: Recipe) -> list[Problem]:
    problems: list[Problem] = []
    training = recipe.training
    warmup = training.schedule.warmup.in_epochs(training.epochs)
    if warmup is not None and warmup > training.epochs:
        problems.append(
            (
                ("training", "schedule", "warmup"),
                f"warm-up ({training.schedule.warmup}) is longer than the run "
                f"({training.epochs} epochs)",
            )
        )
    if training.accumulate > training.batch_size:
        problems.append(
            (
                ("training", "accumulate"),
                f"accumulate is {training.accumulate} but batch_size is {training.batch_size}: "
                "a micro-batch holds at least one image; lower accumulate",
            )
        )
    if training.accumulate > 1 and training.nonfinite_loss == "skip":
        problems.append(
            (
                ("training", "accumulate"),
                "nonfinite_loss: skip decides before the backward pass, which accumulate splits "
                "into parts; use nonfinite_loss: stop with accumulate, or accumulate: 1",
            )
        )
    if training.compile:
        for i, phase in enumerate(recipe.phases):
            if phase.not_compilable:
                problems.append(
                    (
                        ("training", "compile"),
                        f"phases[{i}] ({phase.kind}) cannot train under compile: "
                        f"{phase.not_compilable}; set compile: false",
                    )
                )
    if recipe.data.mixes and training.batch_size % 2:
        problems.append(
            (
                ("data", "mixup" if recipe.data.mixup else "cutmix"),
                f"mixup and cutmix mix images in pairs, but training.batch_size "
                f"{training.batch_size} is odd; make it even (a multiple of twice the number of "
                "processes under torchrun)",
            )
        )
    if training.peak_lr > MAX_LR:
        problems.append(
            (
                ("training", "optimizer", "lr_scaling"),
                f"the scaled learning rate {training.describe_lr()} is above {MAX_LR:g}; "
                "lower lr, or raise lr_base_batch",
            )
        )
    return problems
