"""The image side of a supported ViT: the input it takes and the grid of patches it makes.

Most families keep a `patch_embed` (a conv over pixels, or a CNN backbone then a 1x1 conv in the
hybrid ViTs) that knows its image size and grid; NaFlexViT keeps `embeds`, a Linear over
flattened patches that takes any size, and its position grid stands for its size.
"""

from __future__ import annotations

from torch import nn


def patch_embedding(model: nn.Module) -> nn.Module:
    """The module that turns images into patch tokens."""
    embed = getattr(model, "patch_embed", None)
    return embed if embed is not None else model.embeds


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model takes."""
    embed = patch_embedding(model)
    channels = getattr(embed, "in_chans", None) or embed.proj.in_channels
    size = getattr(embed, "img_size", None) or getattr(embed, "default_img_size", None)
    if size is None:  # NaFlexViT: the size its position embeddings were made for
        size = tuple(
            g * p for g, p in zip(embed.pos_embed_grid_size, embed.patch_size, strict=True)
        )
    height, width = (size, size) if isinstance(size, int) else size
    return int(channels), int(height), int(width)


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of patches an input of `input_size` makes."""
    embed = patch_embedding(model)
    grid = getattr(embed, "grid_size", None)
    if grid is None:
        _, height, width = input_size(model)
        grid = (height // embed.patch_size[0], width // embed.patch_size[1])
    return int(grid[0]), int(grid[1])


def patch_count(model: nn.Module) -> int:
    """Patch tokens an input of `input_size` makes (prefix tokens not counted)."""
    rows, columns = patch_grid(model)
    return rows * columns
