"""Physical removal of pruned heads and neurons: smaller Linear layers, fewer heads per block.

`compact_` slices, per attention block, the q, k and v rows (weights and biases) of the kept
heads out of `qkv` (or `q_proj`, `k_proj`, `v_proj`), the matching input columns out of `proj`,
the rows of a gated attention's `gate` and any per-head tensor (separate q/v biases, relative
position bias tables), then tells the module how many heads it keeps (`UnitGroup.resize`, from
`layouts`); per MLP block, the kept `fc1` rows and bias and `fc2` columns. A Linear that the
heads and the neurons share (a parallel block's `in_proj`) is cut once, for both. The result is
the timm model that runs only what was kept.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.layouts import head_groups, neuron_groups
from sparsekit.surgery.units import UnitGroup, UnitTensor


def unit_groups(model: nn.Module, names: list[str] | None = None) -> dict[str, UnitGroup]:
    """The head and neuron groups of `model` by name ("blocks.3.attn", "blocks.3.mlp"),
    reading only the kinds that `names` asks for (all when None)."""
    wanted = names or []
    groups: dict[str, UnitGroup] = {}
    if names is None or any(n.endswith(".attn") for n in wanted):
        groups.update((g.name, g) for g in head_groups(model))
    if names is None or any(n.endswith(".mlp") for n in wanted):
        groups.update((g.name, g) for g in neuron_groups(model))
    return groups


@torch.no_grad()
def compact_(
    model: nn.Module,
    keeps: dict[str, torch.Tensor],
    groups: dict[str, UnitGroup] | None = None,
) -> nn.Module:
    """Remove, in place, every unit whose keep flag is False; return the model.

    Args:
        keeps: bool per unit, by group name ("blocks.3.attn": one per head, "blocks.3.mlp": one
            per hidden neuron). Groups not named are left whole.
        groups: the groups by name, when the caller has them (read from `model` otherwise).

    Raises:
        SparsekitError: a name that is not a head or neuron group of this model, a keep vector
            of the wrong length, or one that keeps no unit at all.
    """
    groups = groups if groups is not None else unit_groups(model, list(keeps))
    cut: dict[str, tuple[UnitGroup, torch.Tensor]] = {}
    for name, keep in keeps.items():
        group = groups.get(name)
        if group is None:
            raise SparsekitError(
                f"{name!r} is not an attention or MLP block of this model; names look like "
                "'blocks.0.attn' and 'blocks.0.mlp'."
            )
        keep = keep.to(torch.bool).flatten()
        if keep.numel() != group.units:
            raise SparsekitError(
                f"{name} has {group.units} {group.kind}, but its keep mask has {keep.numel()}."
            )
        if not keep.any():
            raise SparsekitError(f"{name} would keep no {group.kind}; keep at least one.")
        if not keep.all():
            cut[name] = (group, keep)
    # Every tensor is cut once, to all but the positions of the units dropped from it: a Linear
    # that two groups share (a parallel block's in_proj and out_proj) keeps the other's.
    for linear, parent, rows, cols in _cuts(cut.values()):
        _replace(parent, linear, _sliced(linear, rows, cols))
    for unit_tensor, index in _tensor_cuts(cut.values()):
        _slice_tensor(unit_tensor, index)
    for group, keep in cut.values():
        if group.arrange is not None:
            group.arrange(keep)
        if group.resize is not None:
            group.resize(int(keep.sum()))
    return model


def _cuts(cut) -> list[tuple[nn.Linear, nn.Module, torch.Tensor | None, torch.Tensor | None]]:
    """Per Linear of the `cut` groups (group, keep): its parent and the rows and columns it
    keeps (None: all)."""
    drops: dict[int, list] = {}  # id -> [linear, parent, dropped rows, dropped columns]
    for group, keep in cut:
        for rows in group.rows:
            entry = drops.setdefault(id(rows.linear), [rows.linear, group.module, [], []])
            entry[2].append(group.row_index(~keep, rows))
        entry = drops.setdefault(id(group.consumer), [group.consumer, group.module, [], []])
        entry[3].append(group.column_index(~keep))
    return [
        (linear, parent, _all_but(rows, linear.out_features), _all_but(cols, linear.in_features))
        for linear, parent, rows, cols in drops.values()
    ]


def _tensor_cuts(cut) -> list[tuple[UnitTensor, torch.Tensor]]:
    """Per unit-laid-out tensor of the `cut` groups, the positions it keeps."""
    out = []
    for group, keep in cut:
        for t in group.tensors:
            out.append((t, _all_but([group.tensor_index(t, ~keep)], t.tensor.shape[t.dim])))
    return out


def _all_but(dropped: list[torch.Tensor], size: int) -> torch.Tensor | None:
    """The positions 0..size-1 not in any of `dropped`, in order (None when none is dropped)."""
    if not dropped:
        return None
    kept = torch.ones(size, dtype=torch.bool, device=dropped[0].device)
    for index in dropped:
        kept[index] = False
    return kept.nonzero().flatten()


@torch.no_grad()
def bake_(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    unit_masks: dict[str, torch.Tensor],
    compact: bool,
) -> nn.Module:
    """Turn a plain model plus a run's masks into the model the masks describe: unstructured
    masks multiplied in, dropped heads and neurons removed (`compact`) or zeroed in place."""
    for name, mask in masks.items():
        model.get_parameter(name).mul_(mask.to(torch.bool))
    if compact:
        compact_(model, unit_masks)
    elif unit_masks:
        zero_units_(unit_groups(model, list(unit_masks)), unit_masks)
    return model


def shrink_(model: nn.Module, sizes: dict[str, int]) -> nn.Module:
    """Give each named group its first `size` units: the shape of a compacted model, ready for
    its weights to be loaded (which units were kept no longer matters once they are sliced)."""
    keeps = {}
    for name, group in unit_groups(model, list(sizes)).items():
        if name in sizes:
            keep = torch.zeros(group.units, dtype=torch.bool)
            keep[: sizes[name]] = True
            keeps[name] = keep
    missing = set(sizes) - set(keeps)
    if missing:
        raise SparsekitError(f"this model has no blocks named {sorted(missing)}.")
    return compact_(model, keeps)


@torch.no_grad()
def zero_units_(groups: dict[str, UnitGroup], keeps: dict[str, torch.Tensor]) -> None:
    """Zero the weights of dropped units without changing shapes: the consumer's columns (which
    alone silence a unit) and the producer's rows and biases (so the file shows it)."""
    for name, keep in keeps.items():
        group = groups[name]
        drop = ~keep.to(torch.bool).flatten()
        if not drop.any():
            continue
        group.consumer.weight[:, group.column_index(drop)] = 0
        for producer in group.rows:
            rows = group.row_index(drop, producer)
            producer.linear.weight[rows] = 0
            if producer.linear.bias is not None:
                producer.linear.bias[rows] = 0
        for unit_tensor in group.tensors:
            unit_tensor.tensor.index_fill_(
                unit_tensor.dim, group.tensor_index(unit_tensor, drop), 0
            )


def _sliced(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _slice_tensor(unit_tensor: UnitTensor, index: torch.Tensor) -> None:
    """Keep the `index` entries of a unit-laid-out parameter or buffer, in place of it."""
    old = unit_tensor.tensor
    sliced = old.index_select(unit_tensor.dim, index.to(old.device))
    owner, attr = unit_tensor.owner, unit_tensor.attr
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = sliced  # a buffer stays one, persistent or not


def _replace(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for attr, child in parent.named_children():
        if child is old:
            setattr(parent, attr, new)
            return
    raise AssertionError(f"{type(old).__name__} is not a direct child of {type(parent).__name__}")
