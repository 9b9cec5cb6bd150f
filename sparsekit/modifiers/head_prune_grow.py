"""S2ViTE: structured prune-and-grow of attention heads (and optionally MLP neurons).

Unlike the reference implementation:
- a pruned head or neuron contributes exactly nothing (it is gated at the input of `proj` /
  `fc2`, so its biases cannot leak), and the masked model equals the compacted export;
- growth explores: an inactive unit keeps its weights and still computes its output, so the
  gradient at its gate says what turning it on would gain, even for a unit never active before;
- inactive units are frozen: their gradients are exactly 0, and their weights are restored after
  each optimizer step, so weight decay does not erode them either; their optimizer state is
  zeroed when they are pruned and when they are grown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from sparsekit.errors import RecipeError
from sparsekit.modifiers.prune_grow import PruneGrowModifier
from sparsekit.modifiers.registry import register
from sparsekit.modifiers.schedules import next_update
from sparsekit.recipe.schema import HeadPruneGrowPhase
from sparsekit.surgery.active import ActiveForward
from sparsekit.surgery.units import UnitGate, UnitGroup, head_groups, neuron_groups

if TYPE_CHECKING:
    from sparsekit.session import Session

# A slice of a parameter that belongs to some units: (tensor, dim, index).
Slice = tuple[torch.Tensor, int, torch.Tensor]


@register("head_prune_grow")
class HeadPruneGrow(PruneGrowModifier):
    """Unit masks appear at `start_step`, change every `update_every` steps until `end_step`,
    and stay fixed until the run ends."""

    config: HeadPruneGrowPhase

    def __init__(
        self,
        config: HeadPruneGrowPhase,
        model: nn.Module,
        start_step: int,
        end_step: int,
        groups: list[UnitGroup],
        update_every: int,
        seed: int,
    ):
        super().__init__(config, model, start_step, end_step, groups, update_every, seed)
        self.groups = groups
        self.minimum = {g.name: self._minimum(g) for g in groups}
        self.budgets = {g.name: self._budget(g) for g in groups}
        self.keeps: dict[str, torch.Tensor] = {}
        # Sums of dL/dgate since the last update: over every batch (the prune score of active
        # units) and over the full-size batches just before it (the grow score of inactive ones).
        # Signed sums: the score is |mean gradient|, so summing ranks at the update is exact.
        self.prune_sums: dict[str, torch.Tensor] = {}
        self.grow_sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.grow_seen = 0
        self._gates: dict[str, UnitGate] = {}
        self._active = ActiveForward(groups, self._gates)
        self._grow_batch = False  # this step's batch scores growth (and so runs full size)
        self._frozen: list[Slice] = []
        self._snapshot: list[torch.Tensor] = []

    @classmethod
    def find(cls, config: HeadPruneGrowPhase, model: nn.Module) -> list[UnitGroup]:
        groups = head_groups(model)
        if config.mlp_density is not None:
            groups += neuron_groups(model)
        heads = min(g.units for g in groups if g.kind == "heads")
        if config.min_heads > heads:
            raise RecipeError(
                f"min_heads is {config.min_heads}, but this model's blocks have {heads} heads; "
                f"set min_heads to {heads} or fewer."
            )
        return groups

    def _minimum(self, group: UnitGroup) -> int:
        return self.config.min_heads if group.kind == "heads" else 1

    def _budget(self, group: UnitGroup) -> int:
        density = self.config.head_density if group.kind == "heads" else self.config.mlp_density
        return min(group.units, max(self._minimum(group), round(density * group.units)))

    # --- lifecycle -------------------------------------------------------------------------
    def on_batch_start(self, session: Session) -> None:
        super().on_batch_start(session)
        if not self.initialized:
            return
        upcoming = next_update(session.step + 1, self.start_step, self.end_step, self.update_every)
        # Growth is scored on the last `grow_batches` batches before each update, from the gate
        # gradients of inactive units, which only a full-size step has: those steps run full
        # size, the others (with compute: active) on the kept units only.
        self._grow_batch = (
            upcoming is not None and upcoming - (session.step + 1) < self.config.grow_batches
        )
        if self.compute == "masked" or self._grow_batch:
            self._active.disable()
        else:
            self._active.enable()

    def before_optimizer_step(self, session: Session) -> None:
        if not self.initialized:
            return
        scoring = session.step + 1 < self.end_step  # updates are still to come
        grow = scoring and self._grow_batch
        for name, gate in self._gates.items():
            grad = gate.take_grad()
            if grad is None or not scoring:
                continue
            # A step whose fp16 gradients overflowed carries no ranking: count it as 0.
            grad = grad.nan_to_num_(0.0, posinf=0.0, neginf=0.0).to(torch.float64)
            self.prune_sums[name] += grad
            if grow:
                self.grow_sums[name] += grad
        self.batches += scoring
        self.grow_seen += grow
        if _may_move_frozen(session.optimizer):
            with torch.no_grad():
                self._snapshot = [t.index_select(dim, index) for t, dim, index in self._frozen]

    @torch.no_grad()
    def after_optimizer_step(self, session: Session) -> None:
        # Weight decay moves weights whose gradient is 0: put the frozen units back.
        for (t, dim, index), saved in zip(self._frozen, self._snapshot, strict=False):
            t.index_copy_(dim, index, saved)
        self._snapshot = []

    # --- masks -----------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed)
        for g in self.groups:
            if self.config.init == "magnitude":
                score = _unit_norms(g)
            else:
                score = torch.rand(g.units, generator=generator)
            keep = torch.zeros(g.units, dtype=torch.bool)
            keep[_top(score, self.budgets[g.name])] = True
            self.keeps[g.name] = keep
        self._reset_scores()
        self._install()
        _zero_state(optimizer, self._slices({n: ~k for n, k in self.keeps.items()}))
        return self._counts()

    @torch.no_grad()
    def prune_and_grow(
        self, fraction: float, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        scores = self._mean_scores()
        old = {n: k.clone() for n, k in self.keeps.items()}
        for kind in ("heads", "neurons"):
            groups = [g for g in self.groups if g.kind == kind]
            if not groups:
                continue
            if self.config.budget == "global":
                self._swap(groups, scores, fraction)
            else:
                for g in groups:
                    self._swap([g], scores, fraction)
        changed = {n: old[n] ^ self.keeps[n] for n in self.keeps}
        self._install()
        _zero_state(optimizer, self._slices(changed))
        self._reset_scores()
        swapped = {
            kind: sum(int(changed[g.name].sum()) // 2 for g in self.groups if g.kind == kind)
            for kind in ("heads", "neurons")
        }
        return {
            "heads_swapped": swapped["heads"],
            "neurons_swapped": swapped["neurons"],
            **self._counts(),
        }

    def _reset_scores(self) -> None:
        self.prune_sums = {g.name: _zeros_beside(g) for g in self.groups}
        self.grow_sums = {g.name: _zeros_beside(g) for g in self.groups}
        self.batches = self.grow_seen = 0

    def _mean_scores(self) -> dict[str, torch.Tensor]:
        """Per unit: the prune score (|mean gate gradient| over the batches since the last
        update) if it is active, the grow score (the same over the full-size batches) if not.
        Under torch.distributed the sums and batch counts of all ranks are added first (one
        all-reduce per update): the mean over ranks of each rank's gradient is the gradient of
        the whole batch, so every rank takes the decision a single process would."""
        prune_sums, grow_sums, batches, grow_seen = self._run_sums()
        return {
            n: torch.where(
                self.keeps[n],
                (prune_sums[n] / max(1, batches)).abs(),
                (grow_sums[n] / max(1, grow_seen)).abs(),
            )
            for n in prune_sums
        }

    def _run_sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
        """The score sums and batch counts of the whole run, on the CPU: this rank's, plus every
        other rank's under torch.distributed (one all-reduce, which every rank must join)."""
        names = list(self.prune_sums)
        device = self.prune_sums[names[0]].device if names else torch.device("cpu")
        counts = torch.tensor([self.batches, self.grow_seen], dtype=torch.float64, device=device)
        flat = torch.cat([*self.prune_sums.values(), *self.grow_sums.values(), counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        flat = flat.cpu()
        sizes = [self.prune_sums[n].numel() for n in names]
        half = sum(sizes)
        return (
            dict(zip(names, flat[:half].split(sizes), strict=True)),
            dict(zip(names, flat[half : 2 * half].split(sizes), strict=True)),
            int(flat[-2]),
            int(flat[-1]),
        )

    def _swap(self, groups: list[UnitGroup], scores: dict[str, torch.Tensor], fraction: float):
        """Prune the lowest-scoring kept units of `groups` (never below a group's minimum), then
        grow as many of the highest-scoring units not kept; just-pruned units compete too."""
        keep = torch.cat([self.keeps[g.name] for g in groups])
        score = torch.cat([scores[g.name] for g in groups])
        owner = [i for i, g in enumerate(groups) for _ in range(g.units)]
        room = [int(self.keeps[g.name].sum()) - self.minimum[g.name] for g in groups]
        active = int(keep.sum())
        n_swap = min(math.ceil(fraction * active), keep.numel() - active)
        pruned: list[int] = []
        for unit in _order(score, keep, ascending=True):
            if len(pruned) == n_swap:
                break
            if room[owner[unit]] > 0:
                room[owner[unit]] -= 1
                pruned.append(unit)
        keep[pruned] = False
        grown = _order(score, ~keep, ascending=False)[: len(pruned)]
        keep[grown] = True
        offset = 0
        for g in groups:
            self.keeps[g.name] = keep[offset : offset + g.units].clone()
            offset += g.units

    def _install(self) -> None:
        """Point the gates at the current masks and list the slices that are frozen."""
        for g in self.groups:
            if g.name in self._gates:
                self._gates[g.name].set(self.keeps[g.name])
            else:
                self._gates[g.name] = UnitGate(g, self.keeps[g.name])
        self._active.set(self.keeps)
        self._frozen = self._slices({n: ~k for n, k in self.keeps.items()})

    def _slices(self, selected: dict[str, torch.Tensor]) -> list[Slice]:
        """Every parameter slice that belongs to the selected units: producer rows and biases,
        consumer columns."""
        out: list[Slice] = []
        for g in self.groups:
            units = selected[g.name]
            if not units.any():
                continue
            for producer, chunks in g.rows:
                rows = g.row_index(units, chunks)
                out.append((producer.weight, 0, rows))
                if producer.bias is not None:
                    out.append((producer.bias, 0, rows))
            out.append((g.consumer.weight, 1, g.column_index(units)))
        return out

    def _counts(self) -> dict[str, Any]:
        """Event fields: units kept by kind, and which heads each block keeps (for reports)."""
        counts: dict[str, Any] = {
            f"{kind}_kept": sum(
                int(self.keeps[g.name].sum()) for g in self.groups if g.kind == kind
            )
            for kind in ("heads", "neurons")
        }
        counts["heads"] = {
            g.name: self.keeps[g.name].nonzero().flatten().tolist()
            for g in self.groups
            if g.kind == "heads"
        }
        return counts

    # --- reporting and resume --------------------------------------------------------------
    def units_owned(self) -> list[str]:
        return [g.name for g in self.groups]

    def unit_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.keeps)

    def state_dict(self) -> dict[str, Any]:
        """Under torch.distributed every rank must call this: the score sums of all ranks are
        added up (the checkpoint holds the run's sums, not one rank's)."""
        prune_sums, grow_sums, batches, grow_seen = self._run_sums()
        return {
            "initialized": self.initialized,
            "updates_done": self.updates_done,
            "keeps": dict(self.keeps),
            "prune_sums": prune_sums,
            "grow_sums": grow_sums,
            "batches": batches,
            "grow_seen": grow_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {g.name for g in self.groups}
        if set(state["keeps"]) != names:
            raise ValueError(
                f"checkpoint unit masks name blocks {sorted(state['keeps'])[:3]}..., this model "
                f"has {sorted(names)[:3]}..."
            )
        self.initialized = bool(state["initialized"])
        self.updates_done = int(state["updates_done"])
        self.keeps = {n: k.to(torch.bool).cpu() for n, k in state["keeps"].items()}
        # The saved sums are the whole run's: rank 0 carries them on, the other ranks start from
        # zero, so the next update's all-reduce adds up to what an uninterrupted run would have.
        first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        groups = {g.name: g for g in self.groups}
        for key in ("prune_sums", "grow_sums"):
            sums = {
                n: s.to(_zeros_beside(groups[n]).device, torch.float64) * first
                for n, s in state[key].items()
            }
            setattr(self, key, sums)
        self.batches = int(state["batches"]) if first else 0
        self.grow_seen = int(state["grow_seen"]) if first else 0
        if self.initialized:
            self._install()


def _zeros_beside(group: UnitGroup) -> torch.Tensor:
    """A score accumulator on the model's device, so scoring a step never waits for it."""
    return torch.zeros(group.units, dtype=torch.float64, device=group.consumer.weight.device)


def _order(score: torch.Tensor, among: torch.Tensor, ascending: bool) -> list[int]:
    """Indices of the units in `among`, by score; ties keep index order (deterministic)."""
    index = among.nonzero().flatten()
    order = torch.sort(score[index], descending=not ascending, stable=True).indices
    return index[order].tolist()


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(score, descending=True, stable=True).indices[:k]


@torch.no_grad()
def _unit_norms(group: UnitGroup) -> torch.Tensor:
    """L2 norm of each unit's weights: its producer rows and its consumer columns."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for producer, chunks in group.rows:
        rows = producer.weight.detach().double().pow(2).sum(1).cpu()
        total += rows.view(chunks, group.units, group.width).sum((0, 2))
    cols = group.consumer.weight.detach().double().pow(2).sum(0).cpu()
    total += cols.view(group.units, group.width).sum(1)
    return total.sqrt()


def _may_move_frozen(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer can move a weight whose gradient is exactly 0: weight decay does
    (AdamW's decoupled decay, or the L2 term of Adam and SGD); unknown optimizers might."""
    if optimizer is None:
        return True
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        return True
    return any(group.get("weight_decay", 0.0) for group in optimizer.param_groups)


@torch.no_grad()
def _zero_state(optimizer: torch.optim.Optimizer | None, slices: list[Slice]) -> None:
    """Zero the optimizer's per-weight tensors (Adam moments, momentum) on these slices."""
    if optimizer is None:
        return
    for t, dim, index in slices:
        for value in optimizer.state.get(t, {}).values():
            if torch.is_tensor(value) and value.shape == t.shape:
                value.index_fill_(dim, index, 0)
