"""S2ViTE head and neuron prune-and-grow: exactness, exploration, budgets, frozen units, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_vit, train_step

from sparsekit import Session, load_recipe
from sparsekit.errors import RecipeError, SparsekitError
from sparsekit.modifiers.head_prune_grow import HeadPruneGrow
from sparsekit.surgery.compact import compact_


def head_recipe(**phase) -> dict:
    return {
        "name": "heads",
        "training": {"epochs": 4, "batch_size": 8, "schedule": {"warmup": 0}},
        "phases": [
            {
                "kind": "head_prune_grow",
                "head_density": 0.5,
                "mlp_density": 0.5,
                "update_every": "2 steps",
                "min_update_interval": "1 steps",
                "end": "100%",
                **phase,
            }
        ],
    }


def run(recipe: dict, steps: int, model=None, check=None, weight_decay: float = 0.05, seed=0):
    """Train a tiny ViT (4 heads per block) for `steps` real steps under `recipe`."""
    torch.manual_seed(seed)
    model = model or tiny_vit(num_heads=4, embed_dim=64, mlp_ratio=2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    session = Session.from_recipe(load_recipe(recipe), model, optimizer, steps_per_epoch=4)
    heads = next(m for m in session.modifiers if isinstance(m, HeadPruneGrow))
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=data)
        y = torch.randint(0, 10, (8,), generator=data)
        train_step(session, model, optimizer, x, y)
        if check:
            check(session, heads, optimizer)
    return model, session, heads, optimizer


def test_masked_model_equals_compacted_model() -> None:
    model, session, heads, _ = run(head_recipe(), 9)
    assert heads.updates_done == 4
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        compact = compact_(copy.deepcopy(model), session.unit_masks())
        # The copy's gates were hooks on the old layers: the compacted model runs plain timm.
        assert all(not layer._forward_pre_hooks for layer in compact.modules())
        assert compact.blocks[0].attn.num_heads == 2
        assert compact.blocks[0].attn.qkv.weight.shape == (3 * 2 * 16, 64)
        assert compact.blocks[0].mlp.fc1.weight.shape == (64, 64)
        assert torch.allclose(compact(x), masked, atol=1e-5)


def test_pruned_head_leaks_no_bias() -> None:
    # The reference zeroes only the qkv weight rows, so a pruned head still adds its trained
    # v bias through proj. Here nothing of a pruned head reaches the output.
    model, session, heads, _ = run(head_recipe(mlp_density=None), 3)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        attn = model.blocks[0].attn
        dropped = (~session.unit_masks()["blocks.0.attn"]).nonzero().flatten()
        for h in dropped.tolist():
            for chunk in range(3):
                rows = slice(chunk * 64 + h * 16, chunk * 64 + (h + 1) * 16)
                attn.qkv.bias[rows] = 100.0
                attn.qkv.weight[rows] = 5.0
        assert torch.equal(model(x), before)


def test_budgets_are_exact_per_block_after_every_update() -> None:
    def check(session, heads, optimizer):
        for name, keep in session.unit_masks().items():
            assert int(keep.sum()) == heads.budgets[name]

    _, _, heads, _ = run(head_recipe(), 12, check=check)
    assert heads.budgets["blocks.0.attn"] == 2 and heads.budgets["blocks.0.mlp"] == 64


def test_global_budget_moves_units_between_blocks_within_the_total() -> None:
    totals = []

    def check(session, heads, optimizer):
        masks = session.unit_masks()
        attn = [int(masks[f"blocks.{i}.attn"].sum()) for i in range(2)]
        assert all(a >= 1 for a in attn)  # min_heads
        totals.append(sum(attn))

    run(
        head_recipe(budget="global", update_fraction=1.0, fraction_decay="constant"),
        12,
        check=check,
    )
    assert set(totals) == {4}


def test_growth_explores_neurons_that_were_never_active() -> None:
    ever: dict[str, torch.Tensor] = {}
    explored = []

    def check(session, heads, optimizer):
        for name, keep in session.unit_masks().items():
            if name in ever:
                explored.append(int((keep & ~ever[name]).sum()))
                ever[name] |= keep
            else:
                ever[name] = keep.clone()

    _, _, heads, _ = run(head_recipe(), 10, check=check)
    # Inactive neurons score non-zero (they keep computing behind a closed gate), so growth
    # picks some that had never been on: the reference's growth could only re-pick the pruned.
    assert sum(explored) > 0
    assert all(s.abs().sum() == 0 for s in heads.prune_sums.values())  # reset after the update


def test_inactive_units_do_not_move_and_their_optimizer_state_is_zero() -> None:
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    compared = []

    def check(session, heads, optimizer):
        masks = session.unit_masks()
        for g in heads.groups:
            drop = ~masks[g.name]
            cols = g.column_index(drop)
            weight = g.consumer.weight[:, cols].detach().clone()
            previous = saved.get(g.name)
            if previous is not None and torch.equal(previous[0], drop):
                # Same mask as the step before: weight decay did not shrink the frozen units.
                assert torch.equal(previous[1], weight)
                compared.append(g.name)
            saved[g.name] = (drop.clone(), weight)
            for value in optimizer.state[g.consumer.weight].values():
                if torch.is_tensor(value) and value.shape == g.consumer.weight.shape:
                    assert torch.all(value[:, cols] == 0)

    run(head_recipe(), 9, check=check, weight_decay=0.5)
    assert compared


def test_resume_reproduces_masks_and_weights() -> None:
    straight, s_session, _, _ = run(head_recipe(), 8)

    torch.manual_seed(0)
    model = tiny_vit(num_heads=4, embed_dim=64, mlp_ratio=2.0)
    first, session, _, optimizer = run(head_recipe(), 5, model=model)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict(), session.state_dict()))
    # A fresh process: new model and optimizer, state loaded, the remaining 3 steps taken.
    torch.manual_seed(123)
    resumed = tiny_vit(num_heads=4, embed_dim=64, mlp_ratio=2.0)
    optimizer2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.05)
    session2 = Session.from_recipe(load_recipe(head_recipe()), resumed, optimizer2, 4)
    resumed.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    session2.load_state_dict(saved[2])
    data = torch.Generator().manual_seed(0)
    for step in range(8):
        x = torch.randn(8, 3, 32, 32, generator=data)
        y = torch.randint(0, 10, (8,), generator=data)
        if step < 5:
            continue
        train_step(session2, resumed, optimizer2, x, y)
    for name, keep in s_session.unit_masks().items():
        assert torch.equal(session2.unit_masks()[name], keep)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_magnitude_init_keeps_the_largest_heads() -> None:
    torch.manual_seed(0)
    model = tiny_vit(num_heads=4, embed_dim=64, mlp_ratio=2.0)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 48:] *= 10  # head 3 is by far the largest
    _, session, _, _ = run(head_recipe(init="magnitude", head_density=0.25), 1, model=model)
    assert session.unit_masks()["blocks.0.attn"].tolist() == [False, False, False, True]


def test_min_heads_larger_than_the_model_is_refused() -> None:
    with pytest.raises(RecipeError, match="min_heads is 9"):
        run(head_recipe(min_heads=9), 1)


def test_two_head_phases_are_refused() -> None:
    recipe = head_recipe()
    recipe["phases"].append(dict(recipe["phases"][0]))
    with pytest.raises(RecipeError, match="both head_prune_grow"):
        load_recipe(recipe)


def test_head_phase_inside_dense_warmup_is_refused() -> None:
    recipe = head_recipe(start=2)
    recipe["phases"].insert(0, {"kind": "dense_warmup", "end": 3})
    with pytest.raises(RecipeError, match="inside the dense warm-up"):
        load_recipe(recipe)


def test_attention_that_normalizes_across_heads_is_refused() -> None:
    model = tiny_vit(scale_attn_norm=True)
    with pytest.raises(SparsekitError, match="scale_norm"):
        run(head_recipe(), 1, model=model)


def test_mlp_that_normalizes_across_neurons_is_refused_unless_heads_only() -> None:
    model = tiny_vit(scale_mlp_norm=True)
    with pytest.raises(SparsekitError, match="mlp_density"):
        run(head_recipe(), 1, model=model)
    run(head_recipe(mlp_density=None), 2, model=tiny_vit(scale_mlp_norm=True))


def test_scores_are_all_reduced_when_distributed(tmp_path) -> None:
    # One process group of one rank (gloo): the all-reduce path runs and decides the same.
    import torch.distributed as dist

    _, plain, _, _ = run(head_recipe(), 7)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        _, distributed, _, _ = run(head_recipe(), 7)
    finally:
        dist.destroy_process_group()
    for name, keep in plain.unit_masks().items():
        assert torch.equal(distributed.unit_masks()[name], keep)


def test_min_heads_names_key_value_groups_under_grouped_query_attention() -> None:
    from sparsekit import compile_recipe
    from sparsekit.models import create_model
    from sparsekit.support import small_spec
    from sparsekit.timeline import Timeline

    model = create_model(small_spec("vit_large_patch16_sapiens2"))  # blocks: 16 heads, 8 groups
    recipe = load_recipe(
        {
            "name": "gqa",
            "training": {"epochs": 1, "batch_size": 4, "schedule": {"warmup": 0}},
            "phases": [{"kind": "head_prune_grow", "head_density": 0.5, "min_heads": 16}],
        }
    )
    with pytest.raises(RecipeError, match="8 key/value head groups"):
        compile_recipe(recipe, model, Timeline(1, 2))
