"""Compressed storage of sparse tensors in an export's `model.safetensors`: a tensor's kept
values and a packed bitmask of where they go, instead of the dense tensor with its zeros.

A tensor `NAME` of shape `S` and floating dtype `D` is stored as two safetensors entries, and
the manifest's `compressed` field maps `NAME` to `S`:

- `NAME:values`: 1-D, dtype `D`, the entries that are not zero, in row-major order, bit for
  bit (a NaN is kept as it is; a `-0.0` is a zero, and loads as `0.0`);
- `NAME:mask`: 1-D uint8 of `ceil(numel / 8)` bytes; position `p` of the flattened tensor is
  bit `p % 8` (value `1 << (p % 8)`) of byte `p // 8`, i.e. numpy's
  `packbits(bitorder="little")`; the padding bits after the last position are 0.

The export's hash is over the expanded tensors (what loads), and the manifest with its
`compressed` shapes is under the same hash: an edited value, mask bit or shape is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sparsekit.errors import SparsekitError

STORAGES = ("auto", "dense")
VALUES = ":values"
MASK = ":mask"
# About what a tensor's second safetensors entry and its manifest entry add to the header.
ENTRY_BYTES = 128
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The flattened tensor's bit patterns as integers of the same width."""
    return tensor.reshape(-1).view(_BITS[tensor.element_size()])


def stored_bytes(name: str, tensor: torch.Tensor) -> int:
    """Bytes the tensor takes compressed (values, mask and the extra header entry)."""
    kept = int(torch.count_nonzero(tensor))
    return kept * tensor.element_size() + -(-tensor.numel() // 8) + ENTRY_BYTES + len(name)


class Packed(NamedTuple):
    """A state dict as `pack` writes it."""

    stored: dict[str, torch.Tensor]  # what goes into model.safetensors
    compressed: dict[str, list[int]]  # compressed tensor name -> its shape, for the manifest
    loaded: dict[str, torch.Tensor]  # what the loader gives back (the hash is over these)


def pack(tensors: dict[str, torch.Tensor], storage: str = "auto") -> Packed:
    """The tensors as they are written: with `auto`, each floating-point tensor that is smaller
    as values plus mask is replaced by them (its `-0.0`s, which a baked mask leaves where a
    weight was negative, become `0.0`: the same number, and no entry in the values); with
    `dense`, all stay as they are, bit for bit.
    """
    if storage not in STORAGES:
        raise SparsekitError(
            f"storage {storage!r} is not an export storage; use one of {', '.join(STORAGES)} "
            "(auto: each sparse tensor compressed when that makes it smaller; dense: every "
            "tensor as it is, which plain timm can load)."
        )
    packed = Packed({}, {}, {})
    for name, tensor in tensors.items():
        if VALUES in name or MASK in name:  # cannot be mistaken for a compressed entry
            raise SparsekitError(
                f"tensor {name!r}: its name holds {VALUES!r} or {MASK!r}, which the export "
                "reserves for compressed tensors; rename the module or export with "
                "--storage dense."
            )
        compress = (
            storage == "auto"
            and tensor.is_floating_point()
            and tensor.numel() > 0
            and stored_bytes(name, tensor) < tensor.numel() * tensor.element_size()
        )
        if not compress:
            packed.stored[name] = packed.loaded[name] = tensor
            continue
        bits = _bits(tensor.contiguous())
        keep = tensor.reshape(-1) != 0  # NaN is kept, -0.0 is not
        packed.stored[name + VALUES] = bits[keep].view(tensor.dtype).clone()
        packed.stored[name + MASK] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
        packed.compressed[name] = list(tensor.shape)
        packed.loaded[name] = torch.where(keep, bits, 0).view(tensor.dtype).reshape(tensor.shape)
    return packed


def unpack(
    file: Path, stored: dict[str, torch.Tensor], shapes: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """The export's tensors at their own shapes: each compressed one expanded from its values
    and mask, after checking that they fit each other.

    Raises:
        SparsekitError: a compressed tensor with a missing entry, a mask of the wrong length
            or dtype, set padding bits, or a number of values other than the mask's set bits.
    """

    def damaged(name: str, what: str) -> SparsekitError:
        return SparsekitError(
            f"{file}: the compressed tensor {name!r} is damaged ({what}), so the file was "
            "modified or damaged after export (the storage layout is in docs/export.md). Export "
            "it again from the run folder."
        )

    tensors = {k: v for k, v in stored.items() if not k.endswith((VALUES, MASK))}
    for key in stored.keys() - tensors.keys():
        name = key.rsplit(":", 1)[0]
        if name not in shapes:
            raise damaged(name, f"the file holds {key!r} but the manifest lists no such tensor")
    for name, shape in shapes.items():
        values, mask = stored.get(name + VALUES), stored.get(name + MASK)
        if values is None or mask is None:
            raise damaged(name, f"{name + (VALUES if values is None else MASK)!r} is missing")
        if name in tensors:
            raise damaged(name, "it is stored both dense and compressed")
        numel = math.prod(shape)
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != -(-numel // 8):
            raise damaged(
                name,
                f"its mask is {mask.dtype} of shape {list(mask.shape)}, not uint8 of "
                f"[{-(-numel // 8)}] for shape {shape}",
            )
        if not values.is_floating_point() or values.dim() != 1:
            raise damaged(name, f"its values are {values.dtype} of shape {list(values.shape)}")
        bits = np.unpackbits(mask.numpy(), bitorder="little")
        if bits[numel:].any():
            raise damaged(name, f"mask bits past its {numel} positions are set")
        keep = bits[:numel].view(bool)  # NumPy: several times faster than torch's bool kernels
        kept = int(np.count_nonzero(keep))
        if kept != values.numel():
            raise damaged(
                name, f"its mask sets {kept} positions but it holds {values.numel()} values"
            )
        width = _BITS[values.element_size()]
        dense = np.zeros(numel, dtype=torch.empty(0, dtype=width).numpy().dtype)
        dense[keep] = values.view(width).numpy()
        tensors[name] = torch.from_numpy(dense).view(values.dtype).reshape(shape)
    return tensors
