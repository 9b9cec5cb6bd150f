"""The parameter slices that belong to heads and neurons, and keeping them still.

A unit owns rows of the layers that produce it (and their biases) and columns of the layer
that consumes it. A switched unit's optimizer state is zeroed or restarted over those slices
(`unit_positions`), and an inactive unit's slices are put back after every optimizer step that
may move them (`FrozenSlices`): weight decay moves a weight whose gradient is 0.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.surgery.units import UnitGroup

# A slice of a parameter that belongs to some units: (tensor, dim, index).
Slice = tuple[torch.Tensor, int, torch.Tensor]


def unit_slices(groups: list[UnitGroup], selected: dict[str, torch.Tensor]) -> list[Slice]:
    """Every parameter slice that belongs to the selected units (a bool per unit, by group
    name): producer rows and biases, consumer columns, and their slices of other per-unit
    parameters."""
    out: list[Slice] = []
    for g in groups:
        units = selected[g.name]
        if not units.any():
            continue
        for producer in g.rows:
            rows = g.row_index(units, producer)
            out.append((producer.linear.weight, 0, rows))
            if producer.linear.bias is not None:
                out.append((producer.linear.bias, 0, rows))
        out.append((g.consumer.weight, 1, g.column_index(units)))
        for unit_tensor in g.tensors:
            if isinstance(unit_tensor.tensor, nn.Parameter):  # buffers are never trained
                out.append(
                    (unit_tensor.tensor, unit_tensor.dim, g.tensor_index(unit_tensor, units))
                )
    return out


def slice_positions(slices: list[Slice]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The slices as (parameter, bool mask of its positions), one per parameter."""
    out: dict[torch.Tensor, torch.Tensor] = {}
    for t, dim, index in slices:
        if t not in out:
            out[t] = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        out[t].index_fill_(dim, index, True)
    return list(out.items())


def unit_positions(
    groups: list[UnitGroup], selected: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The selected units' positions, one bool mask per parameter: what their optimizer state
    is zeroed or restarted over."""
    return slice_positions(unit_slices(groups, selected))


class FrozenSlices:
    """Parameter slices an optimizer step must leave as they are: copied before the step
    (`save`, where the optimizer may move them) and written back after it (`restore`)."""

    def __init__(self) -> None:
        self.slices: list[Slice] = []
        self._saved: list[tuple[Slice, torch.Tensor]] = []

    @torch.no_grad()
    def save(self) -> None:
        self._saved = [(s, s[0].index_select(s[1], s[2])) for s in self.slices]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved slices back (nothing when none were saved for this step)."""
        for (t, dim, index), saved in self._saved:
            t.index_copy_(dim, index, saved)
        self._saved = []
