"""Back to full size: the inverse of compaction, and the units a full-size model has zeroed.

An export does not record which heads or neurons its run dropped, only what is left: a
compacted export keeps the kept units' weights (how many per block, in its manifest), a masked
one keeps zeros where the dropped units were. `expand_` puts a compacted model's units back
into the full-size model it was cut from, first positions first (which positions they held does
not matter: heads and neurons compute the same function in any order, their weights moving
together), and `zeroed_units` reads which units of a full-size model are all zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.units import UnitGroup


@torch.no_grad()
def zeroed_units(groups: list[UnitGroup]) -> dict[str, torch.Tensor]:
    """Per group, True for each unit with a non-zero weight or bias among its producer rows and
    consumer columns, False for a unit whose every one is exactly 0 (what `zero_units_` leaves
    of a dropped unit: it computes nothing). A group with no non-zero unit at all is read as
    whole, since gating all of it off is never what a model holds."""
    keeps: dict[str, torch.Tensor] = {}
    for g in groups:
        alive = g.live_rows()
        columns = g.consumer.weight[:, g.column_span()]
        alive |= columns.ne(0).any(0).view(g.units, g.width).any(1).cpu()
        for t in g.tensors:
            per_unit = t.tensor.ne(0).movedim(t.dim, 0).reshape(t.chunks, g.units, t.width, -1)
            alive |= per_unit.any(-1).any(-1).any(0).cpu()
        keeps[g.name] = alive if alive.any() else torch.ones(g.units, dtype=torch.bool)
    return keeps


@torch.no_grad()
def expand_(
    full: nn.Module,
    compact: nn.Module,
    full_groups: dict[str, UnitGroup],
    compact_groups: dict[str, UnitGroup],
) -> dict[str, torch.Tensor]:
    """Write the weights of `compact` (the architecture of `full` with fewer units per group,
    as `shrink_` shapes it) into `full`: each group's units at its first positions, the other
    units' rows, biases and columns zero; every other tensor copied as it is. Returns the keep
    mask of every group of `full_groups`.

    Raises:
        SparsekitError: a group of `compact` larger than its full-size one, or a tensor of
            another shape than `full`'s.
    """
    # Per full-size tensor the groups lay out: the compacted tensor it comes from, along which
    # dim, and which of its positions the compacted one holds (all but the dropped units').
    placed: dict[int, tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = {}

    def place(full_tensor, source, dim: int, dropped: torch.Tensor) -> None:
        entry = placed.setdefault(
            id(full_tensor),
            (full_tensor, source, dim, torch.ones(full_tensor.shape[dim], dtype=torch.bool)),
        )
        entry[3][dropped.cpu()] = False

    keeps: dict[str, torch.Tensor] = {}
    for name, g in full_groups.items():
        small = compact_groups[name]
        if small.units > g.units:
            raise SparsekitError(
                f"{name} has {small.units} {g.kind} in the compacted model but {g.units} at full "
                "size; the export is inconsistent."
            )
        keep = torch.zeros(g.units, dtype=torch.bool)
        keep[: small.units] = True
        for producer, source in zip(g.rows, small.rows, strict=True):
            dropped = g.row_index(~keep, producer)
            place(producer.linear.weight, source.linear.weight, 0, dropped)
            if producer.linear.bias is not None:
                place(producer.linear.bias, source.linear.bias, 0, dropped)
        place(g.consumer.weight, small.consumer.weight, 1, g.column_index(~keep))
        for t, source_tensor in zip(g.tensors, small.tensors, strict=True):
            place(t.tensor, source_tensor.tensor, t.dim, g.tensor_index(t, ~keep))
        keeps[name] = keep
    for tensor, source, dim, kept in placed.values():
        index = kept.nonzero().flatten().to(tensor.device)
        if source.shape[dim] != index.numel():
            raise SparsekitError(
                f"a tensor of {tuple(source.shape)} in the compacted model does not fit the "
                f"{index.numel()} of {tuple(tensor.shape)} its units keep at full size; the "
                "export is inconsistent."
            )
        tensor.zero_().index_copy_(dim, index, source.to(tensor.dtype))
    written = set(placed)  # the full-size tensors the groups wrote
    source_state = compact.state_dict()
    for key, tensor in full.state_dict(keep_vars=True).items():
        if id(tensor) in written:
            continue
        value = source_state.get(key)
        if value is None or value.shape != tensor.shape:
            got = "missing" if value is None else tuple(value.shape)
            raise SparsekitError(
                f"{key} is {got} in the compacted model but {tuple(tensor.shape)} at full size; "
                "the export is inconsistent."
            )
        tensor.data.copy_(value)
    return keeps
