"""The mechanics modifiers combine: weight masks, unit slices, optimizer state, grow windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import dst_recipe, tiny_vit

from sparsekit import Session, load_recipe
from sparsekit.surgery.layouts import head_groups, neuron_groups
from sparsekit.surgery.optimizer_state import (
    OptimizerRestarts,
    keeps_zero_weights,
    may_move_without_gradient,
    zero_and_restart,
)
from sparsekit.surgery.targets import find_targets
from sparsekit.surgery.unit_slices import FrozenSlices, slice_positions, unit_positions, unit_slices
from sparsekit.surgery.weight_masks import WeightMasks, as_float


def _stepped(optimizer_class=torch.optim.AdamW, **options):
    """A tiny ViT and an optimizer that has taken one step (so it holds state)."""
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = optimizer_class(model.parameters(), lr=1e-3, **options)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    ("optimizer_class", "options", "keeps_zeros", "moves"),
    [
        (torch.optim.AdamW, {"weight_decay": 0.05}, True, True),
        (torch.optim.AdamW, {"weight_decay": 0.0}, True, False),
        (torch.optim.Adam, {}, True, False),
        (torch.optim.SGD, {"momentum": 0.9}, True, False),
        (torch.optim.SGD, {"weight_decay": 1e-4}, True, True),
        (torch.optim.RMSprop, {}, False, True),
    ],
)
def test_one_list_of_optimizers_answers_both_questions(
    optimizer_class, options, keeps_zeros: bool, moves: bool
) -> None:
    optimizer = optimizer_class([torch.nn.Parameter(torch.zeros(3))], lr=0.1, **options)
    assert keeps_zero_weights(optimizer) is keeps_zeros
    assert may_move_without_gradient(optimizer) is moves


def test_no_optimizer_is_assumed_to_move_zero_weights() -> None:
    assert not keeps_zero_weights(None) and may_move_without_gradient(None)


def test_zero_and_restart_clears_pruned_and_restarts_grown_positions() -> None:
    model, optimizer = _stepped()
    restarts = OptimizerRestarts(optimizer)
    w = model.blocks[0].mlp.fc1.weight
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[0] = True
    grown = torch.zeros_like(w, dtype=torch.bool)
    grown[1, :4] = True
    zero_and_restart(restarts, pruned=[(w, pruned)], grown=[(w, grown)])
    state = optimizer.state[w]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(state[key][pruned | grown] == 0)
        assert torch.count_nonzero(state[key][~(pruned | grown)]) > 0
    (record,) = restarts.state_dict()
    assert record["index"].tolist() == grown.flatten().nonzero().flatten().tolist()
    zero_and_restart(None, pruned=[(w, pruned)])  # a model only inspected: nothing to do


def test_unit_slices_are_the_rows_and_columns_of_the_selected_units() -> None:
    model = tiny_vit()
    heads = head_groups(model)
    neurons = neuron_groups(model)
    attn = model.blocks[0].attn
    width = attn.head_dim
    selected = {g.name: torch.zeros(g.units, dtype=torch.bool) for g in heads}
    selected["blocks.0.attn"][1] = True
    slices = unit_slices(heads, selected)
    assert [
        (t is attn.qkv.weight, t is attn.qkv.bias, t is attn.proj.weight) for t, _, _ in slices
    ] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    size = attn.num_heads * width
    rows = [c * size + width + i for c in range(3) for i in range(width)]
    assert slices[0][1] == 0 and slices[0][2].tolist() == rows
    assert slices[2][1] == 1 and slices[2][2].tolist() == list(range(width, 2 * width))
    positions = dict(slice_positions(slices))
    assert int(positions[attn.qkv.weight].sum()) == 3 * width * attn.qkv.weight.shape[1]
    assert int(positions[attn.proj.weight].sum()) == width * attn.proj.weight.shape[0]
    fc1, fc2 = model.blocks[1].mlp.fc1, model.blocks[1].mlp.fc2
    chosen = {g.name: torch.zeros(g.units, dtype=torch.bool) for g in neurons}
    chosen["blocks.1.mlp"][[0, 5]] = True
    by_param = dict(unit_positions(neurons, chosen))
    assert set(by_param) == {fc1.weight, fc1.bias, fc2.weight}
    assert by_param[fc1.bias].nonzero().flatten().tolist() == [0, 5]
    assert by_param[fc2.weight].any(0).nonzero().flatten().tolist() == [0, 5]


def test_frozen_slices_come_back_after_a_step_only_when_saved() -> None:
    model = tiny_vit()
    (group,) = [g for g in head_groups(model) if g.name == "blocks.0.attn"]
    selected = torch.tensor([True] + [False] * (group.units - 1))
    frozen = FrozenSlices()
    frozen.slices = unit_slices([group], {group.name: selected})
    qkv = model.blocks[0].attn.qkv.weight
    before = qkv.detach().clone()
    frozen.save()
    with torch.no_grad():
        qkv.add_(1.0)
    frozen.restore()
    rows = frozen.slices[0][2]
    others = torch.ones(qkv.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(qkv[rows], before[rows])
    assert torch.equal(qkv[others], before[others] + 1.0)
    moved = qkv.detach().clone()
    frozen.restore()  # nothing saved for this step
    assert torch.equal(qkv.detach(), moved)


def test_weight_masks_keep_exact_budgets_and_zeros_around_a_step() -> None:
    model, optimizer = _stepped(torch.optim.RMSprop)
    targets = find_targets(model, ["fc1", "fc2"], [], [])
    weights = WeightMasks(targets, 0.5, "erk")
    before = {t.name: t.weight.detach().abs().clone() for t in targets}
    weights.set_first(lambda w: w.detach().abs(), OptimizerRestarts(optimizer))
    for t, budget in zip(targets, weights.budgets, strict=True):
        mask = weights.masks[t.name]
        assert int(mask.sum()) == budget
        assert before[t.name][mask].min() >= before[t.name][~mask].max()
        assert torch.all(t.weight[~mask] == 0)
        assert torch.all(optimizer.state[t.weight]["square_avg"][~mask] == 0)
        assert torch.equal(weights.keep[t.name], mask.to(t.weight.dtype))
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    weights.mask_gradients()
    assert all(torch.all(t.weight.grad[~weights.masks[t.name]] == 0) for t in targets)
    with torch.no_grad():
        for t in targets:
            t.weight.add_(1.0)  # an optimizer that moves zero weights
    weights.restore_after_step(optimizer)
    assert all(torch.all(t.weight[~weights.masks[t.name]] == 0) for t in targets)
    assert (
        set(weights.by_parameter()) == set(weights.owned()) == {f"{t.name}.weight" for t in targets}
    )
    restored = WeightMasks(targets, 0.5, "erk")
    restored.load_state_dict(weights.state_dict())
    assert all(torch.equal(restored.masks[n], weights.masks[n]) for n in weights.masks)
    with pytest.raises(ValueError, match="layers this model lacks"):
        restored.load_state_dict({"blocks.9.mlp.fc1": weights.masks[targets[0].name]})


def test_as_float_is_exact() -> None:
    mask = torch.rand(7, 5) > 0.5
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(as_float(mask, dtype), mask.to(dtype))


def test_grow_window_and_updates_ahead_follow_the_update_steps() -> None:
    recipe = load_recipe(dst_recipe(update_every="4 steps", end="100%"))
    session = Session.from_recipe(recipe, tiny_vit(), None, steps_per_epoch=4)
    dst = session.modifiers[0]  # updates after 4, 8 and 12 completed steps of 16
    assert [s for s in range(16) if dst.in_grow_window(s, 1)] == [3, 7, 11]
    assert [s for s in range(16) if dst.in_grow_window(s, 2)] == [2, 3, 6, 7, 10, 11]
    assert [s for s in range(16) if dst.updates_ahead(s)] == list(range(15))
    dst.deferred = 12  # an update due on a skipped step waits: every step scores until it runs
    assert dst.in_grow_window(14, 1) and dst.updates_ahead(15)
