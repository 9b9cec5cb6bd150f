"""Optimizer state at the positions a mask switches: cleared when pruned, fresh when grown.

A pruned weight, head or neuron must not come back with the moments it had, so its per-weight
state (Adam's moments, SGD's momentum) is zeroed. Zeroing is not enough for Adam: its bias
correction uses one step count per tensor, so a moment restarted from 0 at step 1,500 is
divided by (1 - beta^1500) ~ 1 instead of (1 - beta^1) and the regrown weight moves about
(1 - beta1) / sqrt(1 - beta2) ~ 3.2x the learning rate per step, where a fresh Adam moves 1x.
`OptimizerRestarts` keeps, per parameter, the regrown positions and the step count at which
each was regrown, and after every optimizer step rewrites those positions with the step a
fresh Adam would have taken: the moments Adam keeps are the right ones (a restarted EMA is
the fresh one), only the bias correction is per position. One record per parameter, whatever
the number of updates, so the per-step cost is a few passes over the regrown positions. A
position leaves the record once its correction is within float32 rounding of the tensor's
(beta^age < 1e-7: about 16,000 steps at beta2 = 0.999).

For SGD, a zeroed momentum buffer is a fresh one (its next value is the gradient itself, with
dampening 0), so zeroing is exact; other optimizers get their state zeroed only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

# Below this, beta^age leaves the bias correction equal to the tensor's in float32.
_MATURE = 1e-7

# Optimizers whose step leaves a weight at exactly 0 when its gradient and its state are 0
# (decoupled or L2 weight decay of 0 is 0; Adam's update is 0 / (sqrt(0) + eps) = 0). With them
# masking the gradient is enough; any other optimizer gets its weights re-masked every step.
_ADAM = (torch.optim.Adam, torch.optim.AdamW)
_ZERO_PRESERVING = (*_ADAM, torch.optim.SGD)

# Positions of parameters, each as (parameter, bool mask of its shape).
Positions = Iterable[tuple[torch.Tensor, torch.Tensor]]


def keeps_zero_weights(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether a weight at 0 whose gradient and state are 0 stays exactly 0 through a step of
    `optimizer`: then masked weights need no re-masking after the step."""
    return type(optimizer) in _ZERO_PRESERVING


def may_move_without_gradient(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer can move a weight whose gradient is exactly 0: weight decay does
    (AdamW's decoupled decay, or the L2 term of Adam and SGD); unknown optimizers might."""
    if optimizer is None or not keeps_zero_weights(optimizer):
        return True
    return any(group.get("weight_decay", 0.0) for group in optimizer.param_groups)


def zero_and_restart(
    restarts: OptimizerRestarts | None, pruned: Positions = (), grown: Positions = ()
) -> None:
    """Zero the optimizer state at the `pruned` positions and restart it at the `grown` ones;
    nothing without `restarts` (masks made for a model that is only inspected)."""
    if restarts is None:
        return
    for param, where in pruned:
        restarts.zero(param, where)
    for param, where in grown:
        restarts.restart(param, where)


@dataclass
class _Regrown:
    index: torch.Tensor  # flat positions in the parameter
    born: torch.Tensor  # per position, the parameter's step count when it restarted (int64)
    oldest: int  # born.min(), kept on the host: no device sync on every step


class OptimizerRestarts:
    """Zero (`zero`) or restart (`restart`) the optimizer state of masked positions, and make
    restarted positions step as a fresh Adam/AdamW would (`before_step`, `after_step`)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer
        self._regrown: dict[torch.Tensor, _Regrown] = {}
        self._pending: list[tuple[torch.Tensor, int, dict[str, Any], torch.Tensor]] = []

    @property
    def corrects(self) -> bool:
        """Whether this optimizer's steps need a per-position bias correction (Adam, AdamW)."""
        return type(self.optimizer) in _ADAM

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
        regrown = self._regrown.get(param)
        if regrown is not None:
            stay = ~where.reshape(-1).to(regrown.index.device)[regrown.index]
            self._keep(param, stay)

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
        now = _count(state["step"])
        born = torch.full_like(index, now)
        old = self._regrown.get(param)
        if old is not None:
            index, born, now = (
                torch.cat([old.index, index]),
                torch.cat([old.born, born]),
                old.oldest,
            )
        self._regrown[param] = _Regrown(index, born, now)

    def _keep(self, param: torch.Tensor, stay: torch.Tensor) -> None:
        regrown = self._regrown[param]
        if bool(stay.all()):
            return
        if not bool(stay.any()):
            del self._regrown[param]
            return
        born = regrown.born[stay]
        self._regrown[param] = _Regrown(regrown.index[stay], born, int(born.min()))

    # --- around every optimizer step -------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Remember the restarted positions' weights and the hyperparameters of this step."""
        self._pending = []
        if not self._regrown:
            return
        groups = {p: g for g in self.optimizer.param_groups for p in g["params"]}
        for param, regrown in self._regrown.items():
            step = _count(self.optimizer.state[param]["step"])
            saved = param.detach().view(-1).index_select(0, regrown.index)
            self._pending.append((param, step, dict(groups[param]), saved))

    @torch.no_grad()
    def after_step(self) -> None:
        """Rewrite the restarted positions with a fresh Adam's step, if the optimizer stepped."""
        pending, self._pending = self._pending, []
        for param, step_before, group, old in pending:
            state = self.optimizer.state[param]
            step = _count(state["step"])
            if step == step_before:  # no step for this tensor (GradScaler skipped, no grad)
                continue
            b1, b2 = (float(b) for b in group["betas"])
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            decoupled = isinstance(self.optimizer, torch.optim.AdamW) or group.get(
                "decoupled_weight_decay", False
            )
            regrown = self._regrown[param]
            index = regrown.index
            age = (step - regrown.born).to(param.dtype)
            if decoupled:
                old.mul_(1 - lr * wd)
            m = state["exp_avg"].view(-1).index_select(0, index)
            second = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"]
            v = second.view(-1).index_select(0, index)
            # Bias corrections 1 - beta^age = -expm1(age ln beta), per position (accurate in
            # float32 even where beta^age is close to 1).
            fix1 = age.mul(_log(b1)).expm1_().neg_()
            fix2 = age.mul(_log(b2)).expm1_().neg_()
            denom = v.div_(fix2).sqrt_().add_(eps)
            old.sub_(m.div_(fix1).div_(denom).mul_(lr))
            param.detach().view(-1).index_copy_(0, index, old)
            if max(b1, b2) ** (step - regrown.oldest) < _MATURE:
                self._keep(param, max(b1, b2) ** (step - regrown.born).double() >= _MATURE)

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Any]]:
        """The regrown positions, each record naming its parameter by its position in the
        optimizer."""
        position = {p: i for i, p in enumerate(self._params())}
        return [
            {"param": position[p], "index": r.index.cpu(), "born": r.born.cpu()}
            for p, r in self._regrown.items()
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore the records; without an optimizer (a run opened to export or inspect) there
        is nothing to correct and they are left out."""
        self._regrown = {}
        if self.optimizer is None:
            return
        params = self._params()
        for entry in state:
            param = params[int(entry["param"])]
            born = entry["born"].to(param.device, torch.long)
            self._regrown[param] = _Regrown(
                entry["index"].to(param.device, torch.long), born, int(born.min())
            )

    def _params(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _count(step: Any) -> int:
    return int(step.item()) if torch.is_tensor(step) else int(step)
