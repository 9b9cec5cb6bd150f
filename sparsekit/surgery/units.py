"""Structured units of a timm ViT: the heads of each attention and the hidden neurons of each MLP.

A `UnitGroup` says which rows, columns and tensors belong to each unit; `layouts` builds them
from the modules themselves, class by class, so no head count is ever passed by hand. A unit is
switched off by a 0/1 gate on the input of the layer that consumes it (`proj` for heads, `fc2`
for neurons): a gated-off head or neuron then contributes exactly nothing, biases included,
which is what makes the masked model and the physically compacted one compute the same
function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from sparsekit.surgery.edits import ModelEdits


@dataclass(frozen=True)
class UnitTensor:
    """A parameter or buffer laid out unit by unit along `dim` that is not a Linear's rows:
    EVA's and BEiT's separate q and v biases (`width` head_dim), or a relative position bias
    table with one column per head (`width` 1)."""

    owner: nn.Module
    attr: str
    dim: int
    width: int
    chunks: int = 1

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)


class Rows(NamedTuple):
    """Output rows of a Linear that belong to a group's units: `chunks` unit-major chunks (3
    for a fused qkv) from row `start` on. A Linear that feeds two groups (a parallel block's
    `in_proj`, rows [MLP hidden | q | k | v]) holds each group's rows at its own start."""

    linear: nn.Linear
    chunks: int = 1
    start: int = 0


@dataclass(frozen=True)
class UnitGroup:
    """The units of one module: the heads of an attention, or the neurons of an MLP.

    `rows` are the Linear layers whose output rows belong to the units (q, k and v rows of each
    head; the fc1 rows of each neuron; given as `Rows` or as (linear, chunks)), `consumer` the
    Linear whose input columns belong to the units (from column `consumer_start` on, where it
    consumes another group's too), and `tensors` any other tensor laid out by unit. `resize`,
    when set, tells the module how many units it keeps once their slices are cut
    (`compact_`), and `arrange` lines up state held outside it.
    """

    name: str  # e.g. "blocks.3.attn"
    kind: str  # "heads" or "neurons"
    module: nn.Module
    units: int
    width: int  # features per unit: head_dim for heads, 1 for neurons
    rows: tuple[Rows, ...]
    consumer: nn.Linear
    tensors: tuple[UnitTensor, ...] = ()
    consumer_start: int = 0
    resize: Callable[[int], None] | None = None
    # Per-unit state held outside the module, which cannot be cut per block (the rotary
    # frequencies of a `rope_mixed` model): `arrange(keep)` moves the kept units' first, in
    # order, as compaction leaves the module's own units.
    arrange: Callable[[torch.Tensor], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(Rows(*r) for r in self.rows))

    def row_index(self, selected: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Output rows of the producer `rows` that belong to the selected units (a bool per
        unit), in order: for a fused qkv, their q rows, then their k rows, then their v rows."""
        return self.index(selected, rows.chunks, self.width) + rows.start

    def column_index(self, selected: torch.Tensor) -> torch.Tensor:
        """Input columns of the consumer that belong to the selected units, in order."""
        return self.index(selected, 1, self.width) + self.consumer_start

    def row_span(self, rows: Rows) -> slice:
        """All the rows of the producer `rows` that belong to this group's units."""
        return slice(rows.start, rows.start + rows.chunks * self.units * self.width)

    def column_span(self) -> slice:
        """All the consumer's input columns that belong to this group's units."""
        return slice(self.consumer_start, self.consumer_start + self.units * self.width)

    def live_rows(self, biases: bool = True) -> torch.Tensor:
        """Per unit (on the CPU), whether any of its producer rows holds a non-zero weight (or,
        with `biases`, a non-zero bias)."""
        alive = torch.zeros(self.units, dtype=torch.bool)
        for producer in self.rows:
            linear, span = producer.linear, self.row_span(producer)
            rows = linear.weight[span].ne(0).any(1)
            if biases and linear.bias is not None:
                rows |= linear.bias[span].ne(0)
            alive |= rows.view(producer.chunks, self.units, self.width).any(2).any(0).cpu()
        return alive

    def index(self, selected: torch.Tensor, chunks: int, width: int) -> torch.Tensor:
        """Positions along a unit-laid-out axis (`chunks` unit-major chunks of `width` entries
        per unit) that belong to the selected units, in order."""
        units = selected.nonzero().flatten().to(self.consumer.weight.device)
        offsets = torch.arange(width, device=units.device)
        positions = (units[:, None] * width + offsets).flatten()
        return torch.cat([positions + c * self.units * width for c in range(chunks)])

    def tensor_index(self, tensor: UnitTensor, selected: torch.Tensor) -> torch.Tensor:
        return self.index(selected, tensor.chunks, tensor.width)


def kept_counts(groups: list[UnitGroup], keeps: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What an event records of the units kept: the heads and neurons kept in all, and which
    heads each block keeps (the report draws them)."""
    counts: dict[str, Any] = {
        f"{kind}_kept": sum(int(keeps[g.name].sum()) for g in groups if g.kind == kind)
        for kind in ("heads", "neurons")
    }
    counts["heads"] = {
        g.name: keeps[g.name].nonzero().flatten().tolist() for g in groups if g.kind == "heads"
    }
    return counts


class UnitGate:
    """A 0/1 multiplier on the consumer's input, one value per unit, that also scores the units.

    In training, the gate is applied per sample, and the gradient at sample b's gate is
    dL/dg_b = sum over tokens and the unit's features of dL/dO * O, with O the unit's output:
    at gate 1 its absolute value is the first-order Taylor importance of the unit for that
    sample (the reference's head score); at gate 0 it is the gain of turning the unit back on,
    which is non-zero because a gated-off unit keeps its weights and still computes its output.
    That is what lets growth explore units that were never active. The scores are absolute
    values per sample, summed (`take`), so samples of opposite sign never cancel, and each is
    multiplied by the batch size: for a loss that is a mean over the batch this is |dl_b/dg|
    of the sample's own loss, the same whatever the batch is split into across processes.
    """

    def __init__(self, group: UnitGroup, keep: torch.Tensor, edits: ModelEdits | None = None):
        weight = group.consumer.weight
        self.group = group
        self.values = keep.to(weight.device, weight.dtype, copy=True)
        self._abs_sum = torch.zeros(group.units, dtype=torch.float64, device=weight.device)
        self._samples = 0
        self._hook = (edits or ModelEdits()).hook(
            group.consumer.register_forward_pre_hook(self._gate_input)
        )

    def _gate_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple:
        x, *rest = args
        span = self.group.column_span()
        if span.stop - span.start == x.shape[-1]:
            return (self.apply(x), *rest)
        # A consumer of two groups (a parallel block's fused out_proj): gate this one's columns.
        sizes = [span.start, span.stop - span.start, x.shape[-1] - span.stop]
        before, mine, after = x.split(sizes, dim=-1)
        return (torch.cat((before, self.apply(mine), after), dim=-1), *rest)

    def apply(self, x: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """`x` (batch first, features last) times the gates of `units` (all units when None:
        x holds every unit's features; else only those of the listed units, in order)."""
        values = self.values if units is None else self.values.index_select(0, units)
        if torch.is_grad_enabled():
            values = self._per_sample(values, x.shape[0], units)
        else:
            values = values.expand(x.shape[0], -1)
        if self.group.width > 1:
            values = values.repeat_interleave(self.group.width, dim=1)
        shape = (x.shape[0], *([1] * (x.ndim - 2)), values.shape[1])
        return x * values.to(x.dtype).view(shape)

    def _per_sample(self, values: torch.Tensor, batch: int, units: torch.Tensor | None):
        per_sample = values.expand(batch, -1).clone().requires_grad_(True)

        def collect(grad: torch.Tensor) -> None:
            score = grad.detach().abs().sum(0).to(torch.float64).mul_(batch)
            if units is None:
                self._abs_sum.add_(score)
            else:
                self._abs_sum.index_add_(0, units, score)
            self._samples += batch

        per_sample.register_hook(collect)
        return per_sample

    @torch.no_grad()
    def set(self, keep: torch.Tensor) -> None:
        self.values.copy_(keep)

    def take(self) -> tuple[torch.Tensor, int]:
        """The per-unit sum over samples of |dl_b/dg| since the last call, and the number of
        samples (0 when no training forward ran); both are reset."""
        taken = (self._abs_sum.clone(), self._samples)
        self._abs_sum.zero_()
        self._samples = 0
        return taken

    def remove(self) -> None:
        """Take the gate off the model (the consumer runs ungated again)."""
        self._hook.remove()
