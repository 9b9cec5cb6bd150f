"""The transforms of image-folder data, built by timm from the recipe's `data` section, with
what it leaves unset taken from the model's own pretrained config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsekit.errors import UsageError
from sparsekit.recipe.data import Data


def folder_transforms(
    data: Data, model: str, img_size: int
) -> tuple[Callable, Callable, dict[str, Any]]:
    """(train transform, eval transform, the resolved settings) for timm model `model`.

    Raises:
        UsageError: an `auto_augment` policy timm cannot parse.
    """
    from timm.data import create_transform

    from sparsekit.export.preprocessing import folder_preprocessing

    # What the export records is what evaluation uses: one resolution of the settings.
    evaluated = folder_preprocessing(data, model, (3, img_size, img_size))
    settings = {
        "interpolation": data.interpolation or evaluated.interpolation,
        "mean": tuple(evaluated.mean),
        "std": tuple(evaluated.std),
        "crop_pct": evaluated.crop_pct,
    }
    try:
        train = create_transform(
            img_size,
            is_training=True,
            auto_augment=data.auto_augment,
            color_jitter=data.color_jitter,
            hflip=data.hflip,
            interpolation=settings["interpolation"],
            mean=settings["mean"],
            std=settings["std"],
            re_prob=data.reprob,
            re_mode=data.remode,
            re_count=data.recount,
        )
    except (AssertionError, KeyError, ValueError, IndexError) as err:
        raise UsageError(
            f"data.auto_augment {data.auto_augment!r}: timm cannot read this policy ({err!r}). "
            "Write it as timm does, e.g. rand-m9-mstd0.5-inc1 (RandAugment, magnitude 9), "
            "augmix-m5-w4-d2, or original; or set it to null."
        ) from None
    _posterize_to_black_at_zero_bits(train)
    val = create_transform(
        img_size,
        is_training=False,
        interpolation=evaluated.interpolation,  # "random" trains, bicubic evaluates (DeiT)
        mean=settings["mean"],
        std=settings["std"],
        crop_pct=settings["crop_pct"],
    )
    return train, val, settings


def _posterize_to_black_at_zero_bits(transform: Callable) -> None:
    """timm's posterize with 0 bits kept, which RandAugment's increasing posterize reaches at
    its top magnitude (rand-m9-mstd0.5-inc1 does, now and then): Pillow up to 12 gave a black
    image, Pillow 13 raises ValueError, which would stop a run mid-epoch. Give the black image,
    as timm and the reference trained with."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))
        ops += [op for policy in getattr(step, "policy", []) for op in policy]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, black at 0 bits (a module function: workers started by spawn
    unpickle the transforms)."""
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)
