"""Knowledge distillation as DeiT does it: a fixed teacher, and `DistillationLoss`.

The teacher is a timm model built for the data (its classes, channels and, for families that
take one, image size) and filled from a local weights file, read as `--checkpoint` files are
(`sparsekit.models.read_state_dict`: safetensors, or `torch.load(weights_only=True)`); nothing
is downloaded. It is frozen, in eval mode, on the student's device, and runs under `no_grad` on
the very batch the student saw (augmented and mixed), inside the same autocast. It is not in
the checkpoint: it never changes, and it draws no random numbers (its initialisation, before
the file overwrites it, runs on a forked generator), so a resumed run matches an uninterrupted
one.

The loss follows facebookresearch/deit `losses.py`: the base loss on the class output, and the
teacher's supervision on the distillation output, `base x (1 - alpha) + distill x alpha`. timm's
distilled models (`deit_*_distilled_*`, `VisionTransformerDistilled`) are switched to distilled
training, so that training forwards return (class, distillation) logits; any other model
distils on its class output.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.models import (
    DENIED_MODEL_ARGS,
    MAX_PARAMS,
    MODEL_ARG_BOUNDS,
    misfit,
    read_state_dict,
)
from sparsekit.recipe.distillation import Distillation
from sparsekit.train.data_bundle import DataBundle

FIELD = "training.distillation"


def prepare_distillation(
    config: Distillation | None,
    model: nn.Module,
    data: DataBundle,
    device: torch.device,
    note: Callable[[str], None],
) -> nn.Module | None:
    """The teacher of `config` (None without distillation), on `device`; a distilled student
    is switched to returning its two heads' logits in training. Says what it set up to `note`."""
    if config is None:
        return None
    teacher, notes = build_teacher(config, data, device)
    for line in notes:
        note(line)
    params = sum(p.numel() for p in teacher.parameters())
    token = (
        "the student's distillation token"
        if use_distillation_token(model)
        else "the student's class output (it has no distillation token)"
    )
    note(
        f"distillation: {config.type}, alpha {config.alpha:g}"
        + (f", tau {config.tau:g}" if config.type == "soft" else "")
        + f"; teacher {config.teacher} ({params:,} parameters) from {config.teacher_weights} "
        f"supervises {token}."
    )
    return teacher


def use_distillation_token(model: nn.Module) -> bool:
    """Switch a timm distilled model to distilled training (its training forward returns
    (class, distillation) logits; eval still returns their mean). False for other models."""
    setter = getattr(model, "set_distilled_training", None)
    if setter is None:
        return False
    setter(True)
    return True


def build_teacher(
    config: Distillation, data: DataBundle, device: torch.device
) -> tuple[nn.Module, list[str]]:
    """The frozen teacher in eval mode on `device`, and a line per adaptation of its file.

    Raises:
        SparsekitError: unknown name, refused or unbuildable arguments, a missing, unreadable
            or unfitting file, or a head for another number of classes.
    """
    import timm

    name = _teacher_name(config.teacher)
    kwargs = _teacher_kwargs(config, data, name)
    with torch.random.fork_rng(devices=[]):  # timm's initialisation: no draw the run would see
        teacher = timm.create_model(name, pretrained=False, **kwargs)
    notes = load_teacher_weights(teacher, Path(config.teacher_weights), data.num_classes)
    teacher.to(device).eval().requires_grad_(False)
    return teacher, notes


def _teacher_name(name: str) -> str:
    import timm

    for candidate in (name, f"{name}_patch16_224"):  # deit_small as the trainer reads it
        if timm.is_model(candidate):
            return candidate
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Closest timm models: {', '.join(close)}." if close else ""
    raise SparsekitError(
        f"{FIELD}.teacher: timm has no model named {name!r}.{hint} Give the timm name of the "
        "architecture the teacher's weights were saved from (`timm.list_models()` lists them)."
    )


def _teacher_kwargs(config: Distillation, data: DataBundle, name: str) -> dict[str, Any]:
    """num_classes and in_chans of the data, teacher_args, and the data's image (and default
    patch) size where the family takes them, checked on the meta device (nothing allocated)."""
    import timm

    args = dict(config.teacher_args)
    for key in sorted(args.keys() & DENIED_MODEL_ARGS):
        raise SparsekitError(
            f"{FIELD}.teacher_args.{key}: not a teacher argument; teacher_args describe the "
            "architecture only and never open files, download, or pick a device or dtype. "
            f"The weights come from {FIELD}.teacher_weights; remove {key}."
        )
    for key, value in args.items():
        if key in MODEL_ARG_BOUNDS:
            low, high = MODEL_ARG_BOUNDS[key]
            sides = value if isinstance(value, list) else [value]
            if not all(type(s) is int and low <= s <= high for s in sides):
                raise SparsekitError(
                    f"{FIELD}.teacher_args.{key}={value!r}: give an integer from {low} to "
                    f"{high}; larger values are refused before any memory is allocated."
                )
    kwargs = {"num_classes": data.num_classes, "in_chans": data.in_chans, **args}
    optional = {"img_size": data.img_size}
    if data.patch_size and "patch_size" not in args:
        optional["patch_size"] = data.patch_size  # as the student gets it (model_spec)
    while True:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs, **optional)
            break
        except TypeError as err:
            dropped = [k for k in optional if f"'{k}'" in str(err)]
            if not dropped:
                raise _cannot_build(name, {**kwargs, **optional}, err) from None
            optional.pop(dropped[0])  # a family without it (CNNs take any image size)
        except Exception as err:  # noqa: BLE001 - timm's refusal of the arguments
            raise _cannot_build(name, {**kwargs, **optional}, err) from None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and min(grid) < 1:
        raise SparsekitError(
            f"{FIELD}: teacher {name} at the data's image size {data.img_size} has patches of "
            f"{'x'.join(map(str, model.patch_embed.patch_size))} px: an image holds no whole "
            f"patch. Give the patch size it was trained with in {FIELD}.teacher_args.patch_size."
        )
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise SparsekitError(
            f"{FIELD}: teacher {name} would have {params:,} parameters, more than sparsekit "
            f"builds ({MAX_PARAMS:,}); nothing was allocated. Check {FIELD}.teacher_args."
        )
    return {**kwargs, **optional}


def _cannot_build(name: str, kwargs: dict[str, Any], err: Exception) -> SparsekitError:
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return SparsekitError(
        f"{FIELD}: timm cannot build teacher {name} with {shown[:300]}: {type(err).__name__}: "
        f"{lines[0][:300]}. Change or remove {FIELD}.teacher_args (the teacher is built for the "
        "data's classes, channels and image size)."
    )


def load_teacher_weights(teacher: nn.Module, path: Path, num_classes: int) -> list[str]:
    """Fill `teacher` from `path` as timm adapts pretrained weights (a ViT's position and patch
    embeddings resampled, a first convolution of other input channels converted), refusing a
    head for another number of classes: a fresh head would teach noise. Returns a line per
    adaptation."""
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    option = f"{FIELD}.teacher_weights"
    try:
        exists = path.is_file()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise SparsekitError(
            f"{path}: no such teacher weights file ({option}, relative to the working directory "
            f"{Path.cwd()}). Check the path, or give it with --set {option}=PATH."
        )
    state = read_state_dict(path, option=option)
    cfg = getattr(teacher, "pretrained_cfg", {}) or {}
    _check_head(teacher, state, path, cfg.get("classifier") or "head", num_classes)
    notes = []
    if isinstance(teacher, VisionTransformer):
        before = state.get("pos_embed")
        try:
            state = checkpoint_filter_fn(dict(state), teacher, adapt_layer_scale=True)
        except Exception as err:  # noqa: BLE001 - timm's filter fails on another layout
            raise SparsekitError(
                f"{path}: timm cannot adapt these weights to teacher {type(teacher).__name__} "
                f"({type(err).__name__}: {str(err).strip()[:200]}). Give the {FIELD}.teacher and "
                "teacher_args the weights were saved from."
            ) from None
        after = state.get("pos_embed")
        if before is not None and after is not None and before.shape != after.shape:
            notes.append(
                f"teacher {path.name}: position embeddings resampled from {before.shape[1]} to "
                f"{after.shape[1]} tokens (the data's image size)."
            )
    own = teacher.state_dict()
    for conv in _names(cfg.get("first_conv")):
        key, weight = f"{conv}.weight", state.get(f"{conv}.weight")
        if weight is None or key not in own or weight.ndim != 4:
            continue
        if weight.shape[1] != own[key].shape[1] and weight.shape[0] == own[key].shape[0]:
            try:
                state[key] = adapt_input_conv(own[key].shape[1], weight)
            except NotImplementedError:
                continue  # reported as a shape that does not fit
            notes.append(
                f"teacher {path.name}: {conv} converted from {weight.shape[1]} to "
                f"{own[key].shape[1]} input channels (the data's)."
            )
    detail = misfit(own, state, "teacher")
    if detail:
        raise SparsekitError(
            f"{path}: the weights do not fit teacher {type(teacher).__name__} ({detail}). Give "
            f"the timm name ({FIELD}.teacher) and architecture arguments ({FIELD}.teacher_args) "
            "the teacher was trained with; another image size or number of input channels is "
            "adapted, other differences are not."
        )
    teacher.load_state_dict(state)
    return notes


def _check_head(
    teacher: nn.Module, state: dict[str, Any], path: Path, classifier: Any, num_classes: int
) -> None:
    own = teacher.state_dict()
    for head in _names(classifier):
        key = f"{head}.weight"
        if key not in own:
            continue
        if key not in state:
            raise SparsekitError(
                f"{path}: holds no classifier weights ({key}), so the teacher would predict from "
                f"a fresh head, which teaches noise. {FIELD}.teacher_weights must hold the whole "
                f"teacher, head included, trained on the data's {num_classes} classes."
            )
        classes = state[key].shape[0]
        if classes != num_classes:
            raise SparsekitError(
                f"{path}: the teacher's head ({key}) predicts {classes} classes, but the data has "
                f"{num_classes}. A teacher must predict the student's classes (a fresh head would "
                "teach noise): give a teacher trained or fine-tuned on this data, with its head."
            )


def _names(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def distillation_term(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float
) -> torch.Tensor:
    """DeiT's distillation loss between the student's distillation logits and the teacher's:
    hard, cross-entropy against the teacher's top class; soft, the summed KL divergence at
    temperature tau, times tau^2, over `student.numel()` (DeiT's normalisation, kept)."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return (
        F.kl_div(
            F.log_softmax(student.float() / tau, dim=1),
            F.log_softmax(teacher.float() / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (tau * tau)
        / student.numel()
    )


class DistillationLoss:
    """`loss(images, outputs, targets)`: `base` on the class output, times 1 - alpha, plus the
    teacher's supervision of the distillation output (the class output for a model without
    a distillation token), times alpha."""

    def __init__(self, base: Callable, teacher: nn.Module, config: Distillation):
        self.base, self.teacher, self.config = base, teacher, config

    def __call__(self, images: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, tuple):
            outputs, outputs_kd = outputs
        else:
            outputs_kd = outputs
        base_loss = self.base(outputs, targets)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        distill = distillation_term(outputs_kd, teacher_logits, self.config.type, self.config.tau)
        alpha = self.config.alpha
        return base_loss * (1 - alpha) + distill * alpha
