"""N:M masks: exactly N kept of every M consecutive weights along the last dimension (the input
features of a Linear weight), the layout `torch.sparse.to_sparse_semi_structured` and NVIDIA's
sparse tensor cores expect for 2:4.

Groups are the weight reshaped to (-1, M): row r, columns [g*M, (g+1)*M). Selections within a
group break ties by position (a stable sort), so a mask is the same on every run and device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsekit.errors import RecipeError

if TYPE_CHECKING:
    from sparsekit.surgery.targets import Target


def nm_budget(shape: tuple[int, ...] | torch.Size, n: int, m: int) -> int:
    """Weights a layer of `shape` keeps under N:M: N of each of its groups of M."""
    numel = 1
    for size in shape:
        numel *= size
    return numel // m * n


def groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """`tensor` as (groups, M): a view, each row M consecutive entries of the last dimension."""
    if tensor.dim() == 0 or tensor.shape[-1] % m:
        raise ValueError(f"last dimension of shape {tuple(tensor.shape)} is not a multiple of {m}")
    return tensor.reshape(-1, m)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its group (row): 0 for the largest score, ties by position."""
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()  # exact and order-preserving for fp16/bf16
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def nm_topk_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of `scores`' shape keeping the N highest scores of every group of M."""
    return (_ranks(groups(scores.detach(), m)) < n).view(scores.shape)


def nm_grow_mask(scores: torch.Tensor, kept: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The positions to grow so that every group holds exactly N again: in each group, the
    `N - kept` highest `scores` among the positions not `kept` (ties by position).

    `kept` must hold at most N per group (the survivors of a prune); the result is disjoint
    from it, and `kept | grown` holds exactly N in every group.
    """
    kept_groups = groups(kept, m)
    need = n - kept_groups.sum(dim=-1, keepdim=True)
    if bool((need < 0).any()):
        raise ValueError(f"a group already keeps more than {n} of {m}")
    # Kept positions rank last: every candidate outscores them, so the top `need` are free.
    candidates = groups(scores.detach(), m).float().masked_fill(kept_groups, -torch.inf)
    return (_ranks(candidates) < need).view(kept.shape)


def nm_group_counts(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zero (or True) entries of each group of M, as a 1-D tensor."""
    return groups(tensor.detach(), m).ne(0).sum(dim=-1)


def holds_nm(tensor: torch.Tensor, n: int, m: int, exact: bool = False) -> bool:
    """Whether every group of M holds at most N non-zero entries (exactly N with `exact`);
    False where the last dimension is not a multiple of M."""
    if tensor.dim() == 0 or tensor.shape[-1] % m:
        return False
    counts = nm_group_counts(tensor, m)
    return bool((counts == n).all()) if exact else bool((counts <= n).all())


def check_nm_targets(targets: list[Target], n: int, m: int) -> None:
    """Refuse targets a pattern cannot run along: not a Linear, or input features that are not
    a multiple of M.

    Raises:
        RecipeError: naming the first misfits and how to leave them out.
    """
    misfits = [
        t
        for t in targets
        if not isinstance(t.module, nn.Linear) or t.weight.dim() != 2 or t.weight.shape[1] % m
    ]
    if not misfits:
        return
    first = misfits[0]
    if isinstance(first.module, nn.Linear):
        what = f"has {first.weight.shape[1]} input features, not a multiple of {m}"
    else:
        what = f"is a {type(first.module).__name__}, not a Linear layer"
    more = f" ({len(misfits) - 1} more targets too)" if len(misfits) > 1 else ""
    names = ", ".join(f'"{t.name}"' for t in misfits[:4])
    raise RecipeError(
        f"pattern {n}:{m} keeps {n} of every {m} consecutive input weights of each row of a "
        f"Linear weight, but {first.name} {what}{more}. Leave such layers out with "
        f"targets.exclude: [{names}], or pick an M that divides their input features."
    )
