"""Stochastic depth and dropout noise drawn for the whole global batch, as one process draws it.

timm's `DropPath` draws one keep/drop decision per sample and `nn.Dropout` one per element, from
torch's generator of the tensor's device. Under torchrun every rank seeds that generator alike,
so each rank drew, for its own share of the global batch, the noise rank 0 drew for its share:
the same drops repeated on every rank, and not the drops one process draws for those samples.
Stochastic depth reaches the gradients, the weights and so every prune/grow decision (two
processes agreed with one on 0.86 of the mask positions after 3 epochs of a tiny model).

`GlobalBatchNoise(model)` swaps the forward of every `DropPath` and `nn.Dropout` with a
probability above 0 for one that draws the noise of the whole global batch, with timm's own call,
from the same generator state on every rank, and keeps this rank's rows, exactly as token
selection draws its Gumbel noise. Every rank draws as much as one process does, so the generators
advance alike everywhere (and the trainer's checkpoints, which hold them, still resume bit for
bit). Dropout inside the relative-position ViTs' bias MLP (`RelPosMlp`) acts on a bias the
whole batch shares, so it keeps torch's own forward: one draw per forward, alike on every rank,
as one process draws it. In one process the global batch is the local batch and the draw is the
one timm's `drop_path` and torch's CPU dropout make themselves: the results do not change (on
CUDA, `nn.Dropout` no longer uses its fused kernel, so it draws other, equally distributed
numbers).

Rank r's rows are the r-th equal share of the global batch (what `EpochOrder` yields);
an uneven batch states its rows with `batch_rows(start, total)`. Noise that sparsekit cannot draw
this way (attention dropout inside the fused attention kernel, timm's `PatchDropout`) is refused
under torch.distributed.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsekit.errors import SparsekitError

_layout: tuple[int, int] | None = None  # (first row, global batch) stated by `batch_rows`


@contextmanager
def batch_rows(start: int, total: int) -> Iterator[None]:
    """Within the block, this process holds rows `start`, `start + 1`, ... of a global batch of
    `total` samples: for a batch that does not split into equal shares (an uneven last batch).
    Every rank states its own rows, with the same `total`."""
    global _layout
    if not 0 <= start < total:
        raise SparsekitError(f"batch_rows: start {start} is outside a global batch of {total}.")
    previous, _layout = _layout, (start, total)
    try:
        yield
    finally:
        _layout = previous


def global_rows(local: int) -> tuple[int, int]:
    """(first row, size of the global batch) of this process's `local` samples: the stated
    `batch_rows`, else the rank's equal share (one process: the whole batch).

    Raises:
        SparsekitError: `local` samples do not fit at the stated rows.
    """
    if _layout is not None:
        start, total = _layout
        if start + local > total:
            raise SparsekitError(
                f"batch_rows({start}, {total}): this process holds {local} samples, which run "
                f"past the global batch of {total}."
            )
        return start, total
    rank, world = rank_and_world()
    return rank * local, world * local


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalBatchNoise:
    """The model's stochastic depth and dropout, drawn for the global batch; `remove()` restores
    timm's own forwards.

    Raises:
        SparsekitError: under torch.distributed with more than one process (when built, or at
            the first training forward if the process group is joined later), the model has
            noise that cannot be drawn for the global batch: attention dropout in the fused
            attention kernel, or patch dropout.
    """

    def __init__(self, model: nn.Module):
        from timm.layers import DropPath, PatchDropout
        from timm.layers.pos_embed_rel import RelPosMlp

        self.model = model
        self._batch: int | None = None  # the local batch of the forward in progress
        self._checked = False  # for noise out of reach: now, or at the first distributed step
        self._patch_dropout = PatchDropout
        self.modules: list[nn.Module] = []
        self._check()
        # The relative-position ViTs' bias MLP (`RelPosMlp`) drops out of a bias the whole batch
        # shares: one draw per forward, alike on every rank, which torch's own dropout makes.
        shared = {
            id(m) for rel in model.modules() if isinstance(rel, RelPosMlp) for m in rel.modules()
        }
        for module in model.modules():
            if id(module) in shared:
                continue
            if isinstance(module, DropPath) and module.drop_prob > 0:
                module.forward = types.MethodType(self._drop_path, module)
            elif isinstance(module, nn.Dropout) and module.p > 0:
                module.forward = types.MethodType(self._dropout, module)
            else:
                continue
            self.modules.append(module)
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._end),
        ]

    def remove(self) -> None:
        for module in self.modules:
            del module.forward  # back to the class's forward
        for handle in self._handles:
            handle.remove()
        self.modules.clear()

    # --- the model's forward: which batch the noise is for --------------------------------
    def _check(self) -> None:
        if not self._checked and rank_and_world()[1] > 1:
            _refuse_unreachable(self.model, self._patch_dropout)
            self._checked = True

    def _start(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if model.training:
            self._check()
        x = args[0] if args else next(iter(kwargs.values()), None)
        self._batch = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else None

    def _end(self, model: nn.Module, args: tuple, out) -> None:
        self._batch = None

    def _rows(self, x: torch.Tensor, module: nn.Module) -> tuple[int, int]:
        local = x.shape[0]
        if self._batch is not None and local != self._batch:
            raise SparsekitError(
                f"{type(module).__name__} got a tensor of {local} rows in a forward pass of "
                f"{self._batch} samples; its noise can only be drawn per sample when the first "
                "dimension is the batch."
            )
        return global_rows(local)

    # --- the forwards ---------------------------------------------------------------------
    def _drop_path(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """timm's `drop_path`, with the keep decisions of the global batch's rows."""
        if not module.training:
            return x
        keep = 1.0 - module.drop_prob
        start, total = self._rows(x, module)
        shape = (total,) + (1,) * (x.ndim - 1)
        mine = x.new_empty(shape).bernoulli_(keep)[start : start + x.shape[0]]
        if keep > 0.0 and module.scale_by_keep:
            mine.div_(keep)
        return x * mine

    def _dropout(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`nn.Dropout`, with the elements of the global batch's rows (drawn as torch's own CPU
        dropout draws them: one `bernoulli_` over the whole tensor)."""
        if not module.training:
            return x
        if module.p == 1.0:
            return x.mul_(0.0) if module.inplace else x * 0.0
        keep = 1.0 - module.p
        start, total = self._rows(x, module)
        noise = x.new_empty((total, *x.shape[1:])).bernoulli_(keep)
        mine = noise[start : start + x.shape[0]].div_(keep)
        return x.mul_(mine) if module.inplace else x * mine


def _refuse_unreachable(model: nn.Module, patch_dropout: type) -> None:
    for name, module in model.named_modules():
        attn_drop = getattr(module, "attn_drop", None)
        p = getattr(module, "attn_drop_p", getattr(attn_drop, "p", 0.0))
        if getattr(module, "fused_attn", False) and p > 0:
            raise SparsekitError(
                f"{name} drops attention weights (attn_drop {p}) inside the fused attention "
                "kernel, which draws its own noise on each process, so two processes would not "
                "train as one does. Build the model with attn_drop_rate=0 (--model-arg "
                "attn_drop_rate=0), or train in one process."
            )
        if isinstance(module, patch_dropout) and module.prob > 0:
            raise SparsekitError(
                f"{name} drops patches (patch_drop_rate {module.prob}) with noise each process "
                "draws for itself, so two processes would not train as one does. Build the model "
                "with patch_drop_rate=0 (--model-arg patch_drop_rate=0), or train in one process."
            )
