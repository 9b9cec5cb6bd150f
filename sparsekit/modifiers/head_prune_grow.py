"""S2ViTE: structured prune-and-grow of attention heads (and optionally MLP neurons).

Unlike the reference implementation:
- a pruned head or neuron contributes exactly nothing (it is gated at the input of `proj` /
  `fc2`, so its biases cannot leak), and the masked model equals the compacted export;
- growth explores: an inactive unit keeps its weights and still computes its output, so the
  gradient at its gate says what turning it on would gain, even for a unit never active before;
- units are scored as the reference scores heads, by first-order Taylor importance per sample
  (|sum of dL/dO x O| over the unit's output O), averaged over the samples of every batch
  since the last update (the reference looks at the last batch only); growth scores every
  unit that is not kept (just-pruned ones included) by the same estimator, over the last
  `grow_batches` batches before the update;
- inactive units are frozen: their gradients are exactly 0, and their weights are restored after
  each optimizer step, so weight decay does not erode them either; their optimizer state is
  zeroed when they are pruned, and restarted as a fresh optimizer's when they are grown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from rich.table import Table
from torch import nn

from sparsekit.errors import RecipeError, SparsekitError
from sparsekit.modifiers.prune_grow import PruneGrowModifier
from sparsekit.modifiers.registry import register
from sparsekit.recipe.schema import HeadPruneGrowPhase
from sparsekit.surgery.active import ActiveForward
from sparsekit.surgery.compact import zero_units_
from sparsekit.surgery.layouts import head_groups, neuron_groups
from sparsekit.surgery.optimizer_state import may_move_without_gradient, zero_and_restart
from sparsekit.surgery.unit_slices import FrozenSlices, unit_positions, unit_slices
from sparsekit.surgery.units import UnitGate, UnitGroup, kept_counts

if TYPE_CHECKING:
    from sparsekit.modifiers.start_state import StartState
    from sparsekit.session import Session
    from sparsekit.surgery.optimizer_state import OptimizerRestarts


@register(HeadPruneGrowPhase)
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
        total_steps: int | None = None,
    ):
        super().__init__(
            config, model, start_step, end_step, groups, update_every, seed, total_steps
        )
        self.groups = groups
        self.minimum = {g.name: self._minimum(g) for g in groups}
        self.budgets = {g.name: self._budget(g) for g in groups}
        self.keeps: dict[str, torch.Tensor] = {}
        # Per unit, sums over samples of |dl_b/dgate| since the last update: over every batch
        # (the prune score of kept units) and over the full-size batches just before it (the
        # grow score of every unit not kept), with their sample counts. Sums of absolute values
        # and counts add up exactly across ranks at the update.
        self.prune_sums: dict[str, torch.Tensor] = {}
        self.grow_sums: dict[str, torch.Tensor] = {}
        self.prune_samples = 0
        self.grow_samples = 0
        self._gates: dict[str, UnitGate] = {}
        self._active = ActiveForward(groups, self._gates, self.edits)
        self._grow_batch = False  # this step's batch scores growth (and so runs full size)
        self._frozen = FrozenSlices()  # the inactive units' parameters
        # Started from an export (--init-from): the units it kept, this phase's first masks.
        self._start_keeps: dict[str, torch.Tensor] | None = None

    @classmethod
    def find(cls, config: HeadPruneGrowPhase, model: nn.Module) -> list[UnitGroup]:
        groups = head_groups(model)
        if config.prunes_neurons:
            groups += neuron_groups(model)
        heads = min(g.units for g in groups if g.kind == "heads")
        if config.min_heads > heads:
            grouped = any(getattr(g.module, "num_kv_groups", 1) > 1 for g in groups)
            what = "key/value head groups (grouped-query attention)" if grouped else "heads"
            raise RecipeError(
                f"min_heads is {config.min_heads}, but this model's blocks have {heads} {what}; "
                f"set min_heads to {heads} or fewer."
            )
        return groups

    def _minimum(self, group: UnitGroup) -> int:
        return self.config.min_heads if group.kind == "heads" else 1

    def _budget(self, group: UnitGroup) -> int:
        return self.config.kept_units(group.kind, group.units)

    # --- lifecycle -------------------------------------------------------------------------
    def on_batch_start(self, session: Session) -> None:
        super().on_batch_start(session)
        if not self.initialized:
            return
        # Growth is scored on the last `grow_batches` batches before each update, from the gate
        # gradients of inactive units, which only a full-size step has: those steps run full
        # size, the others (with compute: active) on the kept units only.
        self._grow_batch = self.in_grow_window(session.step, self.config.grow_batches)
        if self.compute == "masked" or self._grow_batch:
            self._active.disable()
        else:
            self._active.enable()

    def before_optimizer_step(self, session: Session) -> None:
        if not self.initialized:
            return
        scoring = self.updates_ahead(session.step)
        grow = scoring and self._grow_batch
        samples = 0
        for name, gate in self._gates.items():
            score, samples = gate.take()
            if not samples or not scoring:
                continue
            # A step whose fp16 gradients overflowed carries no ranking: count it as 0.
            score = score.nan_to_num_(0.0, posinf=0.0, neginf=0.0)
            self.prune_sums[name] += score
            if grow:
                self.grow_sums[name] += score
        if scoring:  # every gate saw the same batch
            self.prune_samples += samples
            self.grow_samples += samples if grow else 0
        if may_move_without_gradient(session.optimizer):
            self._frozen.save()

    def after_optimizer_step(self, session: Session) -> None:
        # Weight decay moves weights whose gradient is 0: put the frozen units back.
        self._frozen.restore()

    # --- masks -----------------------------------------------------------------------------
    def start_from(self, start: StartState) -> None:
        """The first masks are the units the export kept, which must be this phase's budget:
        per block (`budget: per_block`), or in all and above `min_heads` (`global`). The
        export's dropped units have zero weights, so one grown back starts from zero."""
        keeps = {g.name: start.unit_keeps[g.name].clone() for g in self.groups}
        for kind, what, field in (
            ("heads", "heads", "heads"),
            ("neurons", "MLP neurons", "mlp_neurons"),
        ):
            groups = [g for g in self.groups if g.kind == kind]
            if not groups:
                continue
            kept = {g.name: int(keeps[g.name].sum()) for g in groups}
            counts = sorted(set(kept.values()))
            theirs = (
                f"{field}: {counts[0]}"
                if len(counts) == 1
                else f"budget: global ({sum(kept.values()):,} {what} in all, {counts[0]} to "
                f"{counts[-1]} per block)"
            )
            if self.config.budget == "global":
                want = sum(self.budgets[g.name] for g in groups)
                low = [g for g in groups if kept[g.name] < self.minimum[g.name]]
                if sum(kept.values()) != want or low:
                    raise SparsekitError(
                        f"the export keeps {sum(kept.values()):,} {what} in all"
                        + (f" ({low[0].name} only {kept[low[0].name]})" if low else "")
                        + f", but this phase keeps {want:,} (budget: global, at least "
                        f"{self.minimum[groups[0].name]} per block); give it the export's "
                        f"counts ({theirs}), or hold them with a fixed_sparsity phase."
                    )
                continue
            wrong = [g for g in groups if kept[g.name] != self.budgets[g.name]]
            if wrong:
                g = wrong[0]
                raise SparsekitError(
                    f"the export keeps {kept[g.name]} of {g.units} {what} in {g.name}, but this "
                    f"phase keeps {self.budgets[g.name]} per block; give it the export's counts "
                    f"({theirs}), or hold them with a fixed_sparsity phase."
                )
        self._start_keeps = keeps

    @torch.no_grad()
    def initialize(self, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed)
        for g in self.groups:
            if self._start_keeps is not None:  # the export's units
                self.keeps[g.name] = self._start_keeps[g.name].clone()
                continue
            if self.config.init == "magnitude":
                score = _unit_norms(g)
            else:
                score = torch.rand(g.units, generator=generator)
            keep = torch.zeros(g.units, dtype=torch.bool)
            keep[_top(score, self.budgets[g.name])] = True
            self.keeps[g.name] = keep
        self._reset_scores()
        self._install()
        dropped = {n: ~k for n, k in self.keeps.items()}
        zero_and_restart(restarts, pruned=unit_positions(self.groups, dropped))
        return self._counts()

    @torch.no_grad()
    def prune_and_grow(self, fraction: float, restarts: OptimizerRestarts | None) -> dict[str, Any]:
        prune_score, grow_score = self._mean_scores()
        old = {n: k.clone() for n, k in self.keeps.items()}
        for kind in ("heads", "neurons"):
            groups = [g for g in self.groups if g.kind == kind]
            if not groups:
                continue
            if self.config.budget == "global":
                self._swap(groups, prune_score, grow_score, fraction)
            else:
                for g in groups:
                    self._swap([g], prune_score, grow_score, fraction)
        changed = {n: old[n] ^ self.keeps[n] for n in self.keeps}
        self._install()
        pruned = {n: changed[n] & old[n] for n in changed}
        grown = {n: changed[n] & self.keeps[n] for n in changed}
        zero_and_restart(
            restarts,
            pruned=unit_positions(self.groups, pruned),
            grown=unit_positions(self.groups, grown),
        )
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
        self.prune_samples = self.grow_samples = 0

    def _mean_scores(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per unit, the prune score (mean over the samples since the last update of the
        per-sample Taylor importance |dl_b/dg|) and the grow score (the same mean over the
        samples of the grow window). Under torch.distributed the sums and sample counts of all
        ranks are added first (one all-reduce per update), so every rank takes the decision a
        single process would take on the same global batches."""
        prune_sums, grow_sums, prune_samples, grow_samples = self._run_sums()
        return (
            {n: s / max(1, prune_samples) for n, s in prune_sums.items()},
            {n: s / max(1, grow_samples) for n, s in grow_sums.items()},
        )

    def _run_sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
        """The score sums and sample counts of the whole run, on the CPU: this rank's, plus
        every other rank's under torch.distributed (one all-reduce, which every rank must
        join)."""
        names = list(self.prune_sums)
        device = self.prune_sums[names[0]].device if names else torch.device("cpu")
        counts = torch.tensor(
            [self.prune_samples, self.grow_samples], dtype=torch.float64, device=device
        )
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

    def _swap(
        self,
        groups: list[UnitGroup],
        prune_score: dict[str, torch.Tensor],
        grow_score: dict[str, torch.Tensor],
        fraction: float,
    ):
        """Prune the kept units of `groups` with the lowest prune score (never below a group's
        minimum), then grow as many of the units not kept with the highest grow score; the
        just-pruned units compete on the same grow score as the others."""
        keep = torch.cat([self.keeps[g.name] for g in groups])
        score = torch.cat([prune_score[g.name] for g in groups])
        gain = torch.cat([grow_score[g.name] for g in groups])
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
        grown = _order(gain, ~keep, ascending=False)[: len(pruned)]
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
                self._gates[g.name] = UnitGate(g, self.keeps[g.name], self.edits)
        self._active.set(self.keeps)
        self._frozen.slices = unit_slices(self.groups, {n: ~k for n, k in self.keeps.items()})

    def _counts(self) -> dict[str, Any]:
        """Event fields: units kept by kind, and which heads each block keeps (for reports)."""
        return kept_counts(self.groups, self.keeps)

    def close(self) -> None:
        """Take the gates and the active forward out, with the dropped units' weights zeroed:
        the plain model computes what the gated one did."""
        super().close()
        if self.initialized:
            zero_units_({g.name: g for g in self.groups}, self.keeps)

    @classmethod
    def describe_on(
        cls, config: HeadPruneGrowPhase, index: int, model: nn.Module, label: str
    ) -> Table:
        """Heads and MLP neurons each block keeps (`HeadPruneGrowPhase.kept_units`).

        Raises:
            RecipeError: an exact count larger than the model's, or min_heads above its heads.
        """
        groups = cls.find(config, model)
        heads = [g for g in groups if g.kind == "heads"]
        neurons = [g for g in groups if g.kind == "neurons"]
        budget = (
            "per block, all run"
            if config.budget == "per_block"
            else "at the first mask; budget: global keeps the total, blocks may trade units"
        )
        table = Table(title=f"phases[{index}] head_prune_grow on {label}: units kept ({budget})")
        for column in ("block", "heads kept", "MLP neurons kept"):
            table.add_column(column)
        totals = [0, 0, 0, 0]
        for b, group in enumerate(heads):
            kept = config.kept_units("heads", group.units)
            totals[0] += kept
            totals[1] += group.units
            cell = "all (MLP whole)"
            if neurons:
                mlp = neurons[b]
                n_kept = config.kept_units("neurons", mlp.units)
                totals[2] += n_kept
                totals[3] += mlp.units
                cell = f"{n_kept:,} of {mlp.units:,}"
            table.add_row(str(b), f"{kept} of {group.units}", cell)
        table.add_row(
            "total",
            f"{totals[0]:,} of {totals[1]:,}",
            f"{totals[2]:,} of {totals[3]:,}" if neurons else "",
        )
        return table

    # --- reporting and resume --------------------------------------------------------------
    def units_owned(self) -> list[str]:
        return [g.name for g in self.groups]

    def unit_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.keeps)

    def state_dict(self) -> dict[str, Any]:
        """Under torch.distributed every rank must call this: the score sums of all ranks are
        added up (the checkpoint holds the run's sums, not one rank's)."""
        prune_sums, grow_sums, prune_samples, grow_samples = self._run_sums()
        return {
            "initialized": self.initialized,
            "updates_done": self.updates_done,
            "deferred": self.deferred,
            "keeps": dict(self.keeps),
            "prune_sums": prune_sums,
            "grow_sums": grow_sums,
            "prune_samples": prune_samples,
            "grow_samples": grow_samples,
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
        self.deferred = state["deferred"]
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
        self.prune_samples = int(state["prune_samples"]) if first else 0
        self.grow_samples = int(state["grow_samples"]) if first else 0
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
    for producer in group.rows:
        rows = producer.linear.weight[group.row_span(producer)].detach()
        rows = rows.double().pow(2).sum(1).cpu()
        total += rows.view(producer.chunks, group.units, group.width).sum((0, 2))
    cols = group.consumer.weight[:, group.column_span()].detach().double().pow(2).sum(0).cpu()
    total += cols.view(group.units, group.width).sum(1)
    return total.sqrt()
