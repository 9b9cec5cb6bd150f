"""`training.ema`: a moving average of the weights, exactly as sparse as the model it follows.

The average is timm's `ModelEmaV3`, updated after every optimizer step that was taken (after
`session.after_optimizer_step()`, so the model's masks are already applied; a skipped step does
not update it). Unlike the DeiT/SViTE reference, whose `ModelEma` is dense, the average then
gets the session's sparsity back: weights a mask drops are zeroed in it, and so are the rows
and columns of every head and neuron the session gates off. It is the average of the weights
the masked model computes with, so a head grown back enters it from zero, as a grown weight
does.

What timm averages is a store of tensors (one per entry of the model's state dict, in its
order), not a copy of the live model: `deepcopy` of the live model would keep the session's
hooks and swapped forwards, whose closures still point at the live model's modules. The EMA is
evaluated by copying its tensors into the live model for a while (`swapped_in`), so the gates,
masks and token selection of the session apply to it exactly as to the model. Every rank of a
torchrun run takes the same updates from the same weights: the averages agree without any
communication.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.utils import ModelEmaV3
from torch import nn

from sparsekit.recipe.ema import Ema
from sparsekit.session import Session
from sparsekit.surgery.compact import unit_groups
from sparsekit.surgery.unit_slices import unit_slices
from sparsekit.surgery.units import UnitGroup
from sparsekit.timeline import Timeline


class _Store(nn.Module):
    """A model's state-dict tensors, in its order, as parameters that take no gradient: the
    module timm's EMA copies and averages (it pairs the two state dicts by position)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for index, tensor in enumerate(state.values()):
            self.register_parameter(f"t{index}", nn.Parameter(tensor, requires_grad=False))


class SparseEma:
    """The moving average of `model`'s state dict (parameters and buffers), by the model's
    names, kept as sparse as `session` says after every update."""

    def __init__(self, config: Ema, model: nn.Module, timeline: Timeline):
        state = model.state_dict()
        self.names = list(state)
        # timm's get_decay(step) copies the model while step <= update_after_step + 1 and
        # decays from then on; sparsekit passes completed steps + 1, so the first step after
        # `start` already averages (from step 0, as the reference's ModelEma does).
        self.timm = ModelEmaV3(
            _Store(state),
            decay=config.decay,
            update_after_step=timeline.steps(config.start),
            use_warmup=config.warmup,
            warmup_gamma=config.warmup_gamma,
            warmup_power=config.warmup_power,
        )
        self.tensors = dict(zip(self.names, self.timm.module.parameters(), strict=True))
        # The live parameter behind each name, for the head and neuron slices found on the model.
        self._by_parameter = {id(p): self.tensors[n] for n, p in model.named_parameters()}
        self._groups: dict[str, UnitGroup] = {}

    @torch.no_grad()
    def update(self, model: nn.Module, session: Session) -> None:
        """Average in the model after an optimizer step (`session.step` steps completed), then
        zero what the session's masks drop."""
        self.timm.update(model, step=session.step + 1)
        self.sparsify(model, session)

    @torch.no_grad()
    def sparsify(self, model: nn.Module, session: Session) -> None:
        """Zero, in the average, every weight a mask drops and every dropped head's and
        neuron's rows and columns (what `zero_units_` zeroes in a plain model)."""
        for name, mask in session.masks().items():
            tensor = self.tensors[name]
            tensor.mul_(mask.to(tensor.device))
        dropped = {name: ~keep.to(torch.bool) for name, keep in session.unit_masks().items()}
        if not dropped:
            return
        if dropped.keys() - self._groups.keys():
            self._groups = unit_groups(model, list(dropped))
        groups = [self._groups[name] for name in dropped]
        for parameter, dim, index in unit_slices(groups, dropped):
            self._by_parameter[id(parameter)].index_fill_(dim, index, 0)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block `model` computes with the average's weights (under its session's
        masks, gates and token selection); after it, with its own again, bit for bit."""
        live = self._matching(model.state_dict(), "the model")
        with torch.no_grad():
            own = {name: tensor.clone() for name, tensor in live.items()}
            for name, tensor in live.items():
                tensor.copy_(self.tensors[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in live.items():
                    tensor.copy_(own[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average as a state dict of the model (what a checkpoint keeps, and what an
        export loads like the model's own weights)."""
        return {name: tensor.detach() for name, tensor in self.tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`.

        Raises:
            ValueError: names or shapes that are not this model's.
        """
        state = self._matching(state, "the saved EMA")
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])

    def _matching(self, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        if list(state) != self.names:
            extra = sorted(set(state) - set(self.names))[:3]
            lacking = sorted(set(self.names) - set(state))[:3]
            raise ValueError(
                f"{what} does not hold the EMA's tensors (extra {extra}, missing {lacking})"
            )
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor) or tensor.shape != self.tensors[name].shape:
                raise ValueError(f"{what}: {name} is not a tensor of the EMA's shape")
        return state
