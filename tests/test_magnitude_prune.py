"""One-shot magnitude pruning: pruned once at `start` by |w|, then fine-tuned with the mask fixed."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit, train_step

from sparsekit import Session, load_recipe
from sparsekit.errors import RecipeError
from sparsekit.modifiers.magnitude_prune import MagnitudePrune
from sparsekit.modifiers.prune_grow import PruneGrowModifier
from sparsekit.surgery.masks import layer_budgets

RECIPE = {
    "name": "oneshot",
    "training": {"epochs": 4, "batch_size": 8, "schedule": {"warmup": 0}},
    "phases": [
        {"kind": "dense_warmup", "end": 2},
        {"kind": "magnitude_prune", "start": 2, "sparsity": 0.7},
    ],
}


def oneshot(seed: int = 0):
    """A tiny ViT under RECIPE (3 steps an epoch: pruned at step 6 of 12), and its optimizer,
    session and magnitude-prune phase."""
    torch.manual_seed(seed)
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    session = Session.from_recipe(load_recipe(RECIPE), model, optimizer, steps_per_epoch=3)
    prune = next(m for m in session.modifiers if isinstance(m, MagnitudePrune))
    return model, optimizer, session, prune


def test_prunes_the_smallest_weights_once_and_keeps_the_mask_fixed() -> None:
    model, optimizer, session, prune = oneshot()
    budgets = layer_budgets([tuple(t.weight.shape) for t in prune.targets], 0.7, "erk")
    masks_seen = []
    for step in range(12):
        if step == 6:  # the weights the one-shot prune will look at
            before = {t.name: t.weight.detach().abs().clone() for t in prune.targets}
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        train_step(session, model, optimizer, x, y)
        if step < 6:
            assert not session.masks() and all(bool(t.weight.ne(0).all()) for t in prune.targets)
            continue
        masks = session.masks()
        masks_seen.append({k: v.clone() for k, v in masks.items()})
        for t, budget in zip(prune.targets, budgets, strict=True):
            mask = masks[f"{t.name}.weight"]
            assert int(mask.sum()) == budget  # exact budget
            assert torch.all(t.weight[~mask] == 0)  # pruned weights stay 0 while fine-tuning
            state = optimizer.state[t.weight]
            assert torch.all(state["exp_avg"][~mask] == 0)
    for t in prune.targets:  # the largest |w| were kept
        kept = masks_seen[0][f"{t.name}.weight"]
        assert before[t.name][kept].min() >= before[t.name][~kept].max()
    assert all(  # never updated
        torch.equal(m[k], masks_seen[0][k]) for m in masks_seen for k in m
    )
    assert [e["event"] for e in session.events] == ["mask_init"]


def test_checkpoints_keep_the_prune_and_grow_keys_and_resume_without_pruning_again() -> None:
    model, optimizer, session, prune = oneshot()
    assert not isinstance(prune, PruneGrowModifier)  # a small modifier of its own
    assert (prune.start_step, prune.end_step) == (6, 12)
    assert [prune.active(s) for s in (5, 6, 11)] == [False, True, True]
    for _ in range(8):
        train_step(session, model, optimizer, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    state = prune.state_dict()
    # The keys checkpoints of this phase have always had (it was built on unstructured DST).
    assert list(state) == ["initialized", "updates_done", "deferred", "masks", "grad_sum"]
    assert (state["initialized"], state["updates_done"], state["deferred"]) == (True, 0, None)
    assert state["grad_sum"] == {} and set(state["masks"]) == {t.name for t in prune.targets}

    resumed_model, resumed_optimizer, resumed, resumed_prune = oneshot(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(session.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    train_step(resumed, resumed_model, resumed_optimizer, x, y)
    assert not resumed.events  # the mask came from the checkpoint, not from pruning again
    masks = session.masks()
    assert resumed.masks().keys() == masks.keys()
    assert all(torch.equal(m, masks[k]) for k, m in resumed.masks().items())
    for t in resumed_prune.targets:
        assert torch.all(t.weight[~masks[f"{t.name}.weight"]] == 0)


def test_shares_no_weights_with_a_dst_phase() -> None:
    recipe = {
        **RECIPE,
        "phases": [
            {"kind": "magnitude_prune", "sparsity": 0.5},
            {"kind": "unstructured_dst", "sparsity": 0.5},
        ],
    }
    with pytest.raises(RecipeError, match=r"phases\[1\].*both make roles"):
        load_recipe(recipe)


def test_refuses_a_start_at_the_end_of_the_run() -> None:
    recipe = {**RECIPE, "phases": [{"kind": "magnitude_prune", "start": "100%", "sparsity": 0.5}]}
    with pytest.raises(RecipeError, match="must come before the run ends"):
        load_recipe(recipe)
