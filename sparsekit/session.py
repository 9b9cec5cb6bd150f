"""The session: drives modifiers through a training run from any loop, built-in or your own.

Call the events in this order around each optimizer step::

    session.batch_start()
    loss.backward()
    session.before_optimizer_step()   # after GradScaler.unscale_, before clipping
    optimizer.step()
    session.after_optimizer_step()

(or `session.skip_step()` instead of the last three when a step is skipped, e.g. on a
non-finite loss), and `session.epoch_end()` after each epoch, `session.finalize()` at the end.
`session.close()` (or leaving `with Session(...) as session:`) gives the model back plain.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.modifiers import Modifier
from sparsekit.recipe.schema import Recipe
from sparsekit.surgery.optimizer_state import OptimizerRestarts
from sparsekit.timeline import Timeline


class Session:
    """Owns the step counter and dispatches events to modifiers in recipe order."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        modifiers: list[Modifier],
        timeline: Timeline,
    ):
        self.model = model
        self.optimizer = optimizer
        self.modifiers = modifiers
        self.timeline = timeline
        # Optimizer state of the positions masks switch: zeroed when pruned, fresh when grown.
        self.restarts = OptimizerRestarts(optimizer)
        self.step = 0  # optimizer steps completed before the current one
        self.epoch = 0
        self.events: list[dict[str, Any]] = []  # prune/grow updates, drained by the caller
        self.closed = False

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        steps_per_epoch: int,
    ) -> Session:
        """Compile `recipe` for `model` (unwrap DDP first) with the loader's length."""
        from sparsekit.compiler import compile_recipe

        timeline = Timeline(recipe.training.epochs, steps_per_epoch)
        return cls(model, optimizer, compile_recipe(recipe, model, timeline), timeline)

    # --- the model given back -------------------------------------------------------------
    def close(self) -> None:
        """Give the model back as the plain timm model it was built as: every phase takes out
        its hooks, replaced forwards and added modules (the last phase first), and heads and
        neurons its masks dropped are zeroed in place, so the plain model computes what the
        masked one did. Token selection has no place in a plain timm model: its scorers leave
        with it (export first, `export_model(..., placements=session.token_placements())`, to
        keep it). The session takes no more steps; closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        for m in reversed(self.modifiers):
            m.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- events ----------------------------------------------------------------------------
    def batch_start(self) -> None:
        if self.closed:
            raise SparsekitError(
                "this session is closed: its phases were taken out of the model. Build a new "
                "Session to train again."
            )
        for m in self.modifiers:
            m.on_batch_start(self)

    def before_optimizer_step(self) -> None:
        for m in self.modifiers:
            m.before_optimizer_step(self)
        self.restarts.before_step()

    def after_optimizer_step(self) -> None:
        self.restarts.after_step()  # first: the modifiers then restore their invariants
        for m in self.modifiers:
            m.after_optimizer_step(self)
        seen = len(self.events)
        for m in self.modifiers:
            m.on_update(self)
        if len(self.events) != seen and dist.is_available() and dist.is_initialized():
            check_ranks_agree(self.masks() | self.unit_masks(), self.step)
        self.step += 1

    def skip_step(self) -> None:
        """This step took no optimizer step (its loss was not finite): the phases see it pass,
        and a prune/grow update due now waits for the next step that trains."""
        for m in self.modifiers:
            m.on_skipped_step(self)
        self.step += 1

    def epoch_end(self) -> None:
        for m in self.modifiers:
            m.on_epoch_end(self)
        self.epoch += 1

    def finalize(self) -> None:
        for m in self.modifiers:
            m.finalize(self)

    def record(self, modifier: Modifier, event: dict[str, Any]) -> None:
        """Keep a modifier's event (e.g. a prune/grow update) for the trainer's metrics log."""
        self.events.append({"phase": modifier.label, "kind": modifier.kind, **event})

    # --- what is sparse now ----------------------------------------------------------------
    def active_phases(self) -> list[str]:
        """Labels of the phases whose window contains the current step."""
        return [m.label for m in self.modifiers if m.active(self.step)]

    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks of every sparse parameter, by parameter name."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modifiers:
            out.update(m.masks())
        return out

    def token_placements(self) -> list[Any]:
        """Token selectors in the model (before which block, keeping which share)."""
        return [p for m in self.modifiers for p in m.token_placements()]

    def unit_masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks of gated heads ("blocks.3.attn") and neurons ("blocks.3.mlp")."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modifiers:
            out.update(m.unit_masks())
        return out

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "modifiers": [{"kind": m.kind, "state": m.state_dict()} for m in self.modifiers],
            "restarts": self.restarts.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [s["kind"] for s in state["modifiers"]]
        mine = [m.kind for m in self.modifiers]
        if saved != mine:
            raise ValueError(f"the checkpoint was made by phases {saved}, this recipe has {mine}")
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        for m, s in zip(self.modifiers, state["modifiers"], strict=True):
            m.load_state_dict(s["state"])
        self.restarts.load_state_dict(state["restarts"])


def check_ranks_agree(masks: dict[str, torch.Tensor], step: int) -> None:
    """Fail loudly if the ranks hold different masks. Two numbers per mask (how many kept, and
    the sum of their positions) are compared across ranks with one min and one max reduction:
    cheap, and only run after an update."""
    names = sorted(masks)
    sums = []
    for name in names:
        kept = masks[name].flatten().nonzero().flatten().to(torch.float64)
        sums += [float(kept.numel()), float(kept.sum())]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    low = torch.tensor(sums, dtype=torch.float64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).view(-1, 2).any(1).nonzero().flatten().tolist()
    if differ:
        raise SparsekitError(
            f"ranks disagree on the masks after the update at step {step + 1} "
            f"({', '.join(names[i] for i in differ[:3])}); decisions must be identical on every "
            "rank. Check that every rank runs the same recipe, model and seed, and that nothing "
            "changes the masks outside sparsekit."
        )
