"""What a data source gives the trainer: the two splits, and what the model must be built for.
Its own module, so that every source (`data.py`'s built-in ones, `image_folder.py`) makes one
without importing the others."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """Train and validation sets plus what the model must be built for."""

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    patch_size: int | None  # None: keep the model's own patch size
    skipped: list[str] = field(default_factory=list)  # unreadable images left out
    # Symbolic links not followed, as "train/cat/up -> /abs/target (loop)"; the reason is
    # 'loop', 'duplicate', 'dangling' or 'points outside train/' (or val/).
    skipped_links: list[str] = field(default_factory=list)
    in_memory: bool = False  # tensors held in memory: loader workers would only add overhead
