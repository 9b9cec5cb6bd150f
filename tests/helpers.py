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
