"""Helpers shared by tests: tiny timm ViTs and minimal recipes."""

from __future__ import annotations

import timm
import torch


def tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    """A real timm ViT, shrunk: 32 px images, 8 px patches, 2 blocks, 10 classes."""
    defaults = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10)
    return timm.create_model(name, **{**defaults, **kwargs})


def dst_recipe(**phase) -> dict:
    """A minimal recipe dict with one unstructured_dst phase (fields overridable)."""
    return {
        "name": "test",
        "training": {"epochs": 4, "batch_size": 16, "schedule": {"warmup": 0}},
        "phases": [
            {
                "kind": "unstructured_dst",
                "sparsity": 0.6,
                "update_every": "2 steps",
                "min_update_interval": "1 steps",
                **phase,
            }
        ],
    }


def train_step(session, forward, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step in the order the session needs; `forward` is the model (or the DDP
    wrapper around it)."""
    import torch.nn.functional as F

    session.batch_start()
    F.cross_entropy(forward(x), y).backward()
    session.before_optimizer_step()
    optimizer.step()
    optimizer.zero_grad()
    session.after_optimizer_step()


def digits_folder(root, per_class: int = 12, val_per_class: int = 4, size: int = 16):
    """scikit-learn's handwritten digits written out as RGB PNG files in an image folder
    (train/CLASS/ and val/CLASS/), enlarged to `size` px: real images through the whole
    image-folder pipeline. Returns `root`."""
    from pathlib import Path

    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        for split, wanted in (("train", per_class), ("val", val_per_class)):
            done = counts.get((split, label), 0)
            if done < wanted:
                counts[(split, label)] = done + 1
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (image * 255 / 16).astype("uint8")
                picture = Image.fromarray(pixels).convert("RGB").resize((size, size))
                picture.save(folder / f"{done}.png")
                break
    return root


def apply_on_folder(recipe: dict, data, out, patch_size: int = 4, *extra: str) -> str:
    """`sparsekit apply` of `recipe` (written beside `out`) on the image folder `data`, with a
    2-block DeiT-Tiny at 16 px; asserts it succeeded and returns its output."""
    from pathlib import Path

    import yaml
    from typer.testing import CliRunner

    from sparsekit.cli.main import app

    out = Path(out)
    file = out.parent / f"{out.name}.yaml"
    file.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(
        app,
        ["apply", str(file), "--model", "deit_tiny", "--img-size", "16", "--patch-size",
         str(patch_size), "--model-arg", "depth=2", "--data", str(data), "--output", str(out),
         *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def randomly_gated(spec, keep_of) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """`spec` built with every weight random (timm's zero biases and tables would hide a
    slicing mistake) and each head and neuron group gated to `keep_of(name, group)`: the
    masked model an export of those keeps must compute, in eval mode, and the keeps."""
    from sparsekit.models import create_model
    from sparsekit.surgery.compact import unit_groups
    from sparsekit.surgery.units import UnitGate

    torch.manual_seed(0)
    model = create_model(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    keeps = {}
    for name, group in unit_groups(model).items():
        keeps[name] = keep_of(name, group)
        UnitGate(group, keeps[name])
    return model, keeps
