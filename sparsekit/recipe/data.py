"""What training images go through before the model sees them: timm's transforms, under timm's
own names and meanings (`timm.data.create_transform`), for image folders.

Unset values (null) come from the model's own pretrained config (`resolve_data_config`): timm's
`vit_*` weights expect mean and std 0.5 and bicubic resizing, DeiT's the ImageNet statistics,
and both a 0.9 centre crop at evaluation. The built-in `digits` and `synthetic` sets are
tensors already normalised, and keep their own light augmentation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from sparsekit.recipe.strict import Strict

Mean = Annotated[float, Field(ge=-10, le=10)]
Std = Annotated[float, Field(gt=0, le=10)]


class Data(Strict):
    """Augmentation and normalisation of image-folder data (`--data FOLDER`)."""

    auto_augment: str | None = Field(
        None,
        max_length=200,
        pattern=r"^[A-Za-z0-9]+(-[A-Za-z0-9.]+)*$",
        description="timm's AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (the "
        "reference's); null: none.",
    )
    color_jitter: float = Field(
        0.4, ge=0, le=1, description="Colour jitter strength (when auto_augment is null)."
    )
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    interpolation: Literal["bilinear", "bicubic", "nearest", "random"] | None = Field(
        None, description="Resizing; null: the model's own (bicubic for ViT and DeiT weights)."
    )
    crop_pct: float | None = Field(
        None, gt=0, le=1, description="Centre crop at evaluation; null: the model's own."
    )
    mean: tuple[Mean, Mean, Mean] | None = Field(
        None, description="Per-channel mean; null: the model's own."
    )
    std: tuple[Std, Std, Std] | None = Field(
        None, description="Per-channel std; null: the model's own."
    )
    reprob: float = Field(0.0, ge=0, le=1, description="Random erasing probability.")
    remode: Literal["const", "rand", "pixel"] = Field(
        "pixel", description="Random erasing fill: const, rand (per channel) or pixel."
    )
    recount: int = Field(1, ge=1, le=16, description="Random erasing count per image.")
