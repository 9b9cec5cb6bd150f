"""Optimizer state at the positions a mask switches: cleared when pruned, fresh when grown.

A pruned weight, head or neuron must not come back with the moments it had, so its per-weight
state (Adam's moments, SGD's momentum) is zeroed. Zeroing is not enough for Adam: its bias
correction uses one step count per tensor, so a moment restarted from 0 at step 1,500 is
divided by (1 - beta^1500) ~ 1 instead of (1 - beta^1) and the regrown weight moves about
(1 - beta1) / sqrt(1 - beta2) ~ 3.2x the learning rate per step, where a fresh Adam moves 1x.
`OptimizerRestarts` keeps, for each group of regrown positions (a cohort), the step count at
which it was born, and after every optimizer step rewrites those positions with the step a
fresh Adam would have taken: the moments Adam keeps are the right ones (a restarted EMA is
the fresh one), only the bias correction is per cohort. A cohort retires once its correction
is within float32 rounding of the tensor's (beta^age < 1e-7: about 16,000 steps at
beta2 = 0.999).

For SGD, a zeroed momentum buffer is a fresh one (its next value is the gradient itself, with
dampening 0), so zeroing is exact; other optimizers get their state zeroed only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Below this, beta^age leaves the bias correction equal to the tensor's in float32.
_MATURE = 1e-7


@dataclass
class _Cohort:
    index: torch.Tensor  # flat positions in the parameter
    born: int  # the parameter's optimizer step count when the positions restarted


class OptimizerRestarts:
    """Zero (`zero`) or restart (`restart`) the optimizer state of masked positions, and make
    restarted positions step as a fresh Adam/AdamW would (`before_step`, `after_step`)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer
        self._cohorts: dict[torch.Tensor, list[_Cohort]] = {}
        self._pending: list[tuple[torch.Tensor, float, dict[str, Any], list[torch.Tensor]]] = []

    @property
    def corrects(self) -> bool:
        """Whether this optimizer's steps need a per-cohort bias correction (Adam and AdamW)."""
        return type(self.optimizer) in (torch.optim.Adam, torch.optim.AdamW)

    # --- at mask updates -------------------------------------------------------------------
    @torch.no_grad()
    def zero(self, param: torch.Tensor, where: torch.Tensor) -> None:
        """Zero every per-weight state tensor of `param` where `where` (a bool mask of its
        shape) is True; those positions stop being corrected."""
        if self.optimizer is None or not bool(where.any()):
            return
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(where.to(value.device), 0)
        cohorts = self._cohorts.get(param)
        if cohorts:
            flat = where.reshape(-1).to(cohorts[0].index.device)
            for cohort in cohorts:
                cohort.index = cohort.index[~flat[cohort.index]]
            self._cohorts[param] = [c for c in cohorts if c.index.numel()]

    @torch.no_grad()
    def restart(self, param: torch.Tensor, where: torch.Tensor) -> None:
        """Zero the state where `where` is True and step those positions as a fresh optimizer
        from now on."""
        self.zero(param, where)
        if not self.corrects or not bool(where.any()):
            return
        state = self.optimizer.state.get(param, {})
        if "step" not in state:  # no step taken yet: the optimizer itself starts fresh
            return
        index = where.reshape(-1).nonzero().flatten().to(param.device)
        self._cohorts.setdefault(param, []).append(_Cohort(index, _count(state["step"])))

    # --- around every optimizer step -------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Remember the restarted positions' weights and the hyperparameters of this step."""
        self._pending = []
        if not self._cohorts:
            return
        groups = {p: g for g in self.optimizer.param_groups for p in g["params"]}
        for param, cohorts in self._cohorts.items():
            state = self.optimizer.state.get(param, {})
            flat = param.detach().view(-1)
            saved = [flat.index_select(0, c.index) for c in cohorts]
            self._pending.append((param, _count(state["step"]), dict(groups[param]), saved))

    @torch.no_grad()
    def after_step(self) -> None:
        """Rewrite the restarted positions with a fresh Adam's step, if the optimizer stepped."""
        pending, self._pending = self._pending, []
        for param, step_before, group, saved in pending:
            state = self.optimizer.state[param]
            step = _count(state["step"])
            if step == step_before:  # no step for this tensor (GradScaler skipped, no grad)
                continue
            b1, b2 = (float(b) for b in group["betas"])
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            decoupled = isinstance(self.optimizer, torch.optim.AdamW) or group.get(
                "decoupled_weight_decay", False
            )
            flat = param.detach().view(-1)
            exp_avg = state["exp_avg"].view(-1)
            second = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"].view(-1)
            for cohort, old in zip(self._cohorts[param], saved, strict=True):
                age = step - cohort.born
                if decoupled:
                    old = old.mul_(1 - lr * wd)
                m = exp_avg.index_select(0, cohort.index)
                v = second.index_select(0, cohort.index)
                denom = v.sqrt_().div_(math.sqrt(1 - b2**age)).add_(eps)
                flat.index_copy_(0, cohort.index, old.addcdiv_(m, denom, value=-lr / (1 - b1**age)))
            self._cohorts[param] = [
                c for c in self._cohorts[param] if max(b1, b2) ** (step - c.born) >= _MATURE
            ]
            if not self._cohorts[param]:
                del self._cohorts[param]

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Any]]:
        """The live cohorts, each naming its parameter by its position in the optimizer."""
        position = {p: i for i, p in enumerate(self._params())}
        return [
            {"param": position[p], "born": c.born, "index": c.index.cpu()}
            for p, cohorts in self._cohorts.items()
            for c in cohorts
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore the cohorts; without an optimizer (a run opened to export or inspect) there
        is nothing to correct and they are left out."""
        self._cohorts = {}
        if self.optimizer is None:
            return
        params = self._params()
        for entry in state:
            param = params[int(entry["param"])]
            cohort = _Cohort(entry["index"].to(param.device, torch.long), int(entry["born"]))
            self._cohorts.setdefault(param, []).append(cohort)

    def _params(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def _count(step: Any) -> int:
    return int(step.item()) if torch.is_tensor(step) else int(step)
