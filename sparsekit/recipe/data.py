"""What training images go through before the model sees them: timm's transforms, under timm's
own names and meanings (`timm.data.create_transform`), for image folders.

Unset values (null) come from the model's own pretrained config (`resolve_data_config`): timm's
`vit_*` weights expect mean and std 0.5 and bicubic resizing, DeiT's the ImageNet statistics,
and both a 0.9 centre crop at evaluation. The built-in `digits` and `synthetic` sets are
tensors already normalised, and keep their own light augmentation.

Mixup, cutmix and repeated augmentation act on batches and on the order of an epoch, not on
one image: they apply to every data source, the built-in sets included.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

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
    mixup: float = Field(
        0.0, ge=0, le=100, description="Mixup alpha (the reference's 0.8); 0: no mixup."
    )
    cutmix: float = Field(
        0.0, ge=0, le=100, description="Cutmix alpha (the reference's 1.0); 0: no cutmix."
    )
    cutmix_minmax: (
        tuple[Annotated[float, Field(gt=0, lt=1)], Annotated[float, Field(gt=0, le=1)]] | None
    ) = Field(
        None,
        description="Cutmix box size as [min, max] fractions of the image (then the box "
        "size is drawn from it, not from cutmix alpha); null: timm's default.",
    )
    mixup_prob: float = Field(
        1.0, ge=0, le=1, description="Probability that a batch (or image) is mixed at all."
    )
    mixup_switch_prob: float = Field(
        0.5, ge=0, le=1, description="With both on: probability of cutmix instead of mixup."
    )
    mixup_mode: Literal["batch", "pair", "elem"] = Field(
        "batch",
        description="batch: one draw for the whole batch (the reference's); pair: one per pair "
        "of images; elem: one per image.",
    )
    repeated_aug: int = Field(
        1,
        ge=1,
        le=16,
        description="Copies of each image in an epoch, each augmented on its own, in the same "
        "global batch (DeiT's repeated augmentation is 3); 1: off. An epoch keeps the data "
        "set's length.",
    )

    @field_validator("cutmix_minmax")
    @classmethod
    def _min_below_max(cls, value):
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"cutmix_minmax {list(value)}: the min must be below the max")
        return value

    def describe(self) -> str:
        """One line for `recipe show`: the augmentation an image folder gets, and the mixing
        and repeats every data source gets."""
        parts = [self.auto_augment or f"colour jitter {self.color_jitter:g}"]
        if self.reprob:
            parts.append(f"random erasing {self.reprob:g}")
        if self.mixes:
            mixed = [f"mixup {self.mixup:g}"] if self.mixup else []
            if self.cutmix_minmax:
                mixed.append(f"cutmix box {list(self.cutmix_minmax)}")
            elif self.cutmix:
                mixed.append(f"cutmix {self.cutmix:g}")
            parts.append(f"{' + '.join(mixed)} ({self.mixup_mode}, p {self.mixup_prob:g})")
        if self.repeated_aug > 1:
            parts.append(f"repeated augmentation x{self.repeated_aug}")
        return "data: " + ", ".join(parts)

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on): the targets are then soft."""
        return (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None) and (
            self.mixup_prob > 0
        )
