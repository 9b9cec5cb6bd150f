"""An export's accuracy on an image folder, through the export's own preprocessing
(`sparsekit eval`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sparsekit.errors import DataError, SparsekitError


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy and mean cross-entropy over `images` images."""

    images: int
    top1: float
    top5: float | None  # None with fewer than 5 classes
    loss: float

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def eval_split(root: Path) -> Path:
    """The folder of class folders to evaluate: `root/val` when `root` is an ImageFolder root
    (train/ and val/), else `root` itself."""
    return root / "val" if (root / "val").is_dir() else root


@torch.no_grad()
def evaluate_folder(
    model: nn.Module,
    root: Path,
    transform,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
) -> Accuracy:
    """`model`'s accuracy on the images under `root` (class folders in sorted order are the
    labels, as training read them).

    Raises:
        SparsekitError: no class folders or images, another number of classes than the model
            predicts, or an unreadable image (named).
    """
    from sparsekit.train.image_folder import ScannedImageFolder, class_folders

    split = eval_split(root)
    try:
        # The classes first: a wrong folder is refused before its tree is walked for images.
        found = class_folders(split)
        classes = getattr(model, "num_classes", None)
        if classes is not None and len(found) != classes:
            raise SparsekitError(
                f"--data {root}: {split} holds {len(found)} class folders, but the export "
                f"predicts {classes} classes. Give the folder of the data set the model was "
                "trained on (its class folders, in the same sorted order, are the labels)."
            )
        images = ScannedImageFolder(str(split), split.name or str(split), transform)
    except (FileNotFoundError, OSError) as err:
        raise SparsekitError(f"--data {root}: {err}") from None
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
    model = model.to(device).eval()
    seen, top1, top5, loss = 0, 0, 0, 0.0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += int((best[:, 0] == y).sum())
            top5 += int((best == y[:, None]).any(dim=1).sum())
            seen += len(y)
    except DataError as err:
        raise SparsekitError(str(err)) from None
    return Accuracy(
        images=seen,
        top1=top1 / seen,
        top5=top5 / seen if logits.shape[1] >= 5 else None,
        loss=loss / seen,
    )
