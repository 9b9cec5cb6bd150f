"""The training loss: what a training step minimises, given the batch it trained on.

One callable, `loss(images, outputs, targets)`, so that the trainer does not know which parts
make it up: cross-entropy with label smoothing on hard labels, or timm's soft-target
cross-entropy on the soft targets mixup and cutmix make (`train/mixing.py`; the smoothing is
then in the targets, as timm's Mixup puts it there). `images` is the batch the model saw, for
losses that run a second model on it: `training.distillation` wraps the base loss in DeiT's
distillation loss, whose teacher runs on those images (`train/distillation.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsekit.recipe.schema import Training
from sparsekit.train.distillation import DistillationLoss

TrainingLoss = Callable[
    [torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor
]


def make_loss(
    training: Training, soft_targets: bool, teacher: nn.Module | None = None
) -> TrainingLoss:
    """The loss of `training`; `soft_targets`: the targets are mixup's class distributions;
    `teacher`: the fixed teacher of `training.distillation` (`prepare_distillation`), given
    exactly when the recipe distils."""
    base: nn.Module = (
        _soft_target_cross_entropy()
        if soft_targets
        else nn.CrossEntropyLoss(label_smoothing=training.label_smoothing)
    )

    if (training.distillation is None) != (teacher is None):
        raise ValueError("make_loss takes a teacher exactly when training.distillation is set")
    if training.distillation is not None:
        return DistillationLoss(base, teacher, training.distillation)

    def loss(images: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        return base(class_logits(outputs), targets)

    return loss


def class_logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The class prediction of a forward's outputs: the logits, or for timm's distilled models
    in distilled training (a (class token, distillation token) pair) their mean, as timm's
    own eval forward returns it."""
    if isinstance(outputs, tuple):
        return sum(outputs) / len(outputs)
    return outputs


def _soft_target_cross_entropy() -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()
