"""The content hashes sparsekit records to detect files changed after writing: of tensors
(checkpoints and exports hash their weights) and of a recipe's text (a checkpoint and an export
both record the recipe.yaml they came from). Integrity checks, not signatures."""

from __future__ import annotations

import hashlib

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's data, bit for bit in its own dtype, from any device or memory layout."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors that changes if any name, dtype, shape or value changes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()


def recipe_sha256(recipe_yaml: str) -> str:
    """The hash checkpoints and exports record of the recipe they were trained under
    (recipe.yaml's text)."""
    return hashlib.sha256(recipe_yaml.encode()).hexdigest()
