"""SViTE dynamic sparse training: invariants after every step and every update of a real run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import dst_recipe, tiny_vit, train_step

from sparsekit import Session, load_recipe
from sparsekit.modifiers.schedules import decayed_fraction, is_update_step, next_update
from sparsekit.modifiers.unstructured_dst import UnstructuredDST


def run_steps(recipe: dict, steps: int, optimizer_name: str = "adamw", check=None, seed: int = 0):
    """Drive a tiny ViT through `steps` real training steps; call `check(session, dst)` after each."""
    torch.manual_seed(seed)
    model = tiny_vit()
    params = model.parameters()
    optimizer = (
        torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        if optimizer_name == "adamw"
        else torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.05)
    )
    session = Session.from_recipe(
        load_recipe(recipe), model, optimizer, steps_per_epoch=max(1, steps // 4)
    )
    dst = next(m for m in session.modifiers if isinstance(m, UnstructuredDST))
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        train_step(session, model, optimizer, x, y)
        if check:
            check(session, dst, optimizer)
    return model, session, dst


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_invariants_hold_after_every_step(optimizer_name: str, grow: str) -> None:
    recipe = dst_recipe(grow=grow, grow_accumulation=2, end="100%")
    seen_updates = []
    previous = {}

    def check(session, dst, optimizer):
        for t, budget in zip(dst.targets, dst.budgets, strict=True):
            mask = dst.masks()[f"{t.name}.weight"]
            # Exact budget per layer: the number grown equals the number pruned.
            assert int(mask.sum()) == budget
            # Masked weights are exactly zero after every optimizer step.
            assert torch.all(t.weight[~mask] == 0)
            # Optimizer state never holds anything at inactive positions.
            for value in optimizer.state[t.weight].values():
                if torch.is_tensor(value) and value.shape == t.weight.shape:
                    assert torch.all(value[~mask] == 0)
            if t.name in previous:
                grown = mask & ~previous[t.name]
                if grown.any():
                    seen_updates.append(session.step)
            previous[t.name] = mask.clone()

    _, session, dst = run_steps(recipe, 16, optimizer_name, check)
    assert dst.updates_done == 7  # every 2 steps strictly inside (0, 16)
    assert seen_updates, "prune/grow never changed a mask"
    kept = sum(dst.budgets)
    total = sum(t.weight.numel() for t in dst.targets)
    assert kept == round(0.4 * total)
    updates = [e["step"] for e in session.events if e["event"] == "mask_update"]
    assert updates == [2, 4, 6, 8, 10, 12, 14]
    assert [e["step"] for e in session.events if e["event"] == "mask_init"] == [0]


def test_grown_weights_start_at_exactly_zero() -> None:
    recipe = dst_recipe(update_fraction=0.5, fraction_decay="constant", end="100%")
    previous: dict[str, torch.Tensor] = {}
    grown_total = []

    def check(session, dst, optimizer):
        masks = dst.masks()
        if previous and session.events and session.events[-1]["step"] == session.step:
            for t in dst.targets:
                name = f"{t.name}.weight"
                grown = masks[name] & ~previous[name]
                assert torch.all(t.weight[grown] == 0)
                grown_total.append(int(grown.sum()))
        previous.update({k: v.clone() for k, v in masks.items()})

    run_steps(recipe, 8, check=check)
    assert sum(grown_total) > 0


def test_gradient_growth_picks_largest_gradients() -> None:
    """One update by hand: the grown set is exactly the top-|grad| inactive positions."""
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay, only masks move
    recipe = load_recipe(
        dst_recipe(
            update_every="1 steps",
            min_update_interval="1 steps",
            end="100%",
            fraction_decay="constant",
            update_fraction=0.25,
            targets={"roles": ["fc1"]},
        )
    )
    session = Session.from_recipe(recipe, model, optimizer, steps_per_epoch=10)
    dst = session.modifiers[0]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    session.batch_start()
    before = {k: v.clone() for k, v in dst.masks().items()}
    F.cross_entropy(model(x), y).backward()
    dense_grads = {f"{t.name}.weight": t.weight.grad.clone() for t in dst.targets}
    magnitudes = {f"{t.name}.weight": t.weight.detach().abs().clone() for t in dst.targets}
    session.before_optimizer_step()
    optimizer.step()
    session.after_optimizer_step()
    for name, new in dst.masks().items():
        # Recompute the update independently with a full sort (no top-k) and compare.
        old = before[name].flatten()
        active = int(old.sum())
        n_swap = math.ceil(0.25 * active)
        magnitude = torch.where(old, magnitudes[name].flatten(), torch.tensor(-1.0))
        keep = torch.zeros_like(old)
        keep[torch.argsort(magnitude, descending=True)[: active - n_swap]] = True
        grad = torch.where(keep, torch.tensor(-1.0), dense_grads[name].abs().flatten())
        expected = keep.clone()
        expected[torch.argsort(grad, descending=True)[:n_swap]] = True
        assert torch.equal(new.flatten(), expected)
        assert int(new.sum()) == active


def test_optimizer_state_zeroed_at_pruned_positions_after_dense_warmup() -> None:
    """Moments built during dense warm-up are wiped where the first mask prunes."""
    recipe = {
        "name": "t",
        "training": {"epochs": 4, "schedule": {"warmup": 0}},
        "phases": [
            {"kind": "dense_warmup", "end": 1},
            {
                "kind": "unstructured_dst",
                "start": 1,
                "sparsity": 0.5,
                "init": "magnitude",
                "update_every": "1 steps",
                "min_update_interval": "1 steps",
                "end": "100%",
            },
        ],
    }
    states = {}

    def check(session, dst, optimizer):
        if not dst.initialized:
            t = dst.targets[0]
            assert (
                torch.count_nonzero(optimizer.state[t.weight]["exp_avg"]) > 0.9 * t.weight.numel()
            )
            return
        for t in dst.targets:
            mask = dst.masks()[f"{t.name}.weight"]
            assert torch.all(optimizer.state[t.weight]["exp_avg"][~mask] == 0)
            assert torch.all(optimizer.state[t.weight]["exp_avg_sq"][~mask] == 0)
        states["checked"] = True

    run_steps(recipe, 12, check=check)
    assert states.get("checked")


def test_dense_warmup_keeps_model_dense_until_its_end() -> None:
    recipe = {
        "name": "t",
        "training": {"epochs": 4, "schedule": {"warmup": 0}},
        "phases": [
            {"kind": "dense_warmup", "end": 2},
            {"kind": "unstructured_dst", "start": 2, "sparsity": 0.5},
        ],
    }
    first_sparse = []

    def check(session, dst, optimizer):
        if dst.initialized and not first_sparse:
            first_sparse.append(session.step)

    run_steps(recipe, 16, check=check)
    # Masks appear at the first batch of step 8 (2 epochs x 4 steps), seen once it completes.
    assert first_sparse == [9]


def test_schedules() -> None:
    assert decayed_fraction(0.5, 0.0, "cosine") == 0.5
    assert decayed_fraction(0.5, 1.0, "cosine") == pytest.approx(0.0)
    assert decayed_fraction(0.5, 0.5, "cosine") == pytest.approx(0.25)
    assert decayed_fraction(0.5, 0.5, "linear") == pytest.approx(0.25)
    assert decayed_fraction(0.5, 0.9, "constant") == 0.5
    assert [c for c in range(20) if is_update_step(c, 2, 12, 3)] == [5, 8, 11]
    assert next_update(3, 2, 12, 3) == 5 and next_update(5, 2, 12, 3) == 5
    assert next_update(12, 2, 12, 3) is None


class DriftingSGD(torch.optim.SGD):
    """An optimizer that moves every weight, zero gradient or not (like some custom updates)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


def test_masks_reapplied_for_optimizers_that_move_zero_weights() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = DriftingSGD(model.parameters(), lr=0.01)
    session = Session.from_recipe(load_recipe(dst_recipe()), model, optimizer, steps_per_epoch=4)
    dst = session.modifiers[0]
    for _ in range(5):
        train_step(session, model, optimizer, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        for t in dst.targets:
            assert torch.all(t.weight[~dst.masks()[f"{t.name}.weight"]] == 0)


def test_non_finite_growth_gradients_keep_counts_exact() -> None:
    """An overflowed gradient (inf/nan) in the growth sum must not break the budget."""
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    recipe = load_recipe(
        dst_recipe(
            update_every="1 steps",
            min_update_interval="1 steps",
            end="100%",
            targets={"roles": ["fc1"]},
        )
    )
    session = Session.from_recipe(recipe, model, optimizer, steps_per_epoch=10)
    dst = session.modifiers[0]
    session.batch_start()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    for t in dst.targets:
        t.weight.grad[0, :5] = float("inf")
        t.weight.grad[1, :5] = float("nan")
    session.before_optimizer_step()
    optimizer.step()
    session.after_optimizer_step()
    assert dst.updates_done == 1
    for t, budget in zip(dst.targets, dst.budgets, strict=True):
        assert int(dst.masks()[f"{t.name}.weight"].sum()) == budget
