"""The method as the paper's reference computes it: per-sample head scores that do not cancel,
one grow estimator for every candidate, regrowth that steps as a fresh optimizer, updates
deferred past skipped steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import dst_recipe, tiny_vit, train_step

from sparsekit import Session, load_recipe
from sparsekit.modifiers.head_prune_grow import HeadPruneGrow
from sparsekit.modifiers.unstructured_dst import UnstructuredDST
from sparsekit.surgery.optimizer_state import OptimizerRestarts


def head_session(compute="active", lr=1e-2, weight_decay=0.01, **phase):
    recipe = {
        "name": "heads",
        "training": {"epochs": 4, "batch_size": 8, "schedule": {"warmup": 0}, "compute": compute},
        "phases": [
            {
                "kind": "head_prune_grow",
                "head_density": 0.5,
                "update_every": "2 steps",
                "min_update_interval": "1 steps",
                "end": "100%",
                **phase,
            }
        ],
    }
    torch.manual_seed(0)
    model = tiny_vit(num_heads=4, embed_dim=64, mlp_ratio=2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    session = Session.from_recipe(load_recipe(recipe), model, optimizer, steps_per_epoch=4)
    heads = next(m for m in session.modifiers if isinstance(m, HeadPruneGrow))
    return model, optimizer, session, heads


# --- 1. per-sample Taylor scores ----------------------------------------------------------
def test_opposite_samples_do_not_cancel() -> None:
    # Sample 1 is sample 0 negated on head 0's features: their contributions to head 0's gate
    # gradient cancel exactly, so |sum| scored head 0 as worthless. Per sample, head 0 (large
    # contributions) outranks head 1 (small ones of one sign).
    model, _, session, heads = head_session(mlp_density=None)
    session.batch_start()  # the first masks and gates
    gate = heads._gates["blocks.0.attn"]
    proj = model.blocks[0].attn.proj
    x = torch.zeros(2, 5, 64)
    x[0, :, 0:16], x[1, :, 0:16] = 1.0, -1.0
    x[:, :, 16:32] = 0.1
    proj(x).sum().backward()
    score, samples = gate.take()
    assert samples == 2
    w = proj.weight.sum(0)  # dL/d(proj input) of every token
    per_sample = torch.stack([(x[b] * w).view(5, 4, 16).sum((0, 2)) for b in range(2)])
    assert per_sample[:, 0].sum().abs() < 1e-5  # the signed score of head 0 cancels
    assert torch.allclose(score.float(), 2 * per_sample.abs().sum(0), rtol=1e-5)
    assert score[0] > 10 * score[1] > 0


@pytest.mark.parametrize("compute", ["active", "masked"])
def test_prune_scores_equal_an_independent_taylor_computation(compute) -> None:
    model, _, session, heads = head_session(compute=compute, mlp_density=0.5)
    reference = tiny_vit(num_heads=4, embed_dim=64, mlp_ratio=2.0)
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))

    session.batch_start()  # the first masks
    F.cross_entropy(model(x), y).backward()
    session.before_optimizer_step()
    masks = session.unit_masks()

    # The reference's criterion with plain hooks: the input O of proj (heads) and fc2
    # (neurons), the gradient at it, |sum over tokens and features of dL/dO * O| per sample.
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def keep_input(name, width):
        def hook(module, args):
            keep = masks[name].to(args[0].dtype).repeat_interleave(width)
            gated = args[0] * keep
            gated.retain_grad()
            seen[name] = (args[0], gated, width)
            return (gated,)

        return hook

    for i, block in enumerate(reference.blocks):
        block.attn.proj.register_forward_pre_hook(keep_input(f"blocks.{i}.attn", 16))
        block.mlp.fc2.register_forward_pre_hook(keep_input(f"blocks.{i}.mlp", 1))
    F.cross_entropy(reference(x), y).backward()
    for name, (out, gated, width) in seen.items():
        b, n, c = out.shape
        taylor = torch.einsum(
            "bnhl,bnhl->bh", gated.grad.view(b, n, c // width, width), out.view(b, n, -1, width)
        )
        expected = taylor.abs().mean(0) * b  # the reference's mean over the batch, per sample
        ours = heads.prune_sums[name] / heads.prune_samples
        kept = masks[name]
        assert heads.prune_samples == 6
        assert torch.allclose(ours[kept].float(), expected[kept], rtol=1e-4, atol=1e-9), name
        assert torch.equal(ours[kept].argsort(), expected[kept].argsort()), name


def test_scores_add_up_over_batches_as_samples() -> None:
    model, optimizer, session, heads = head_session(
        mlp_density=None, update_every="3 steps", min_update_interval="1 steps"
    )
    torch.manual_seed(2)
    for batch in (4, 2):
        train_step(
            session, model, optimizer, torch.randn(batch, 3, 32, 32), torch.zeros(batch).long()
        )
    assert heads.prune_samples == 6


# --- 2. one estimator for every grow candidate --------------------------------------------
def _scored(heads, prune: list[float], grow: list[float]) -> None:
    name = "blocks.0.attn"
    for n in heads.prune_sums:
        heads.prune_sums[n].fill_(1.0)
        heads.grow_sums[n].fill_(1.0)
    heads.prune_sums[name].copy_(torch.tensor(prune, dtype=torch.float64))
    heads.grow_sums[name].copy_(torch.tensor(grow, dtype=torch.float64))
    heads.prune_samples = heads.grow_samples = 1


@pytest.mark.parametrize(
    ("gains", "kept"),
    [
        # a has a zero prune mean and is pruned, but the best grow score: it comes back.
        ({"a": 10.0, "b": 1.0, "c": 1.0, "d": 2.0}, {"a", "b"}),
        # an inactive unit with the best grow score wins over the just-pruned one.
        ({"a": 1.0, "b": 1.0, "c": 3.0, "d": 2.0}, {"b", "c"}),
    ],
)
def test_every_grow_candidate_is_scored_by_the_grow_window(gains, kept) -> None:
    _, _, session, heads = head_session(mlp_density=None)
    session.batch_start()
    keep = heads.keeps["blocks.0.attn"].clone()
    a, b = keep.nonzero().flatten().tolist()
    c, d = (~keep).nonzero().flatten().tolist()
    unit = {"a": a, "b": b, "c": c, "d": d}
    prune, grow = [0.0] * 4, [0.0] * 4
    prune[b] = 5.0  # a: zero prune mean, pruned
    for name, gain in gains.items():
        grow[unit[name]] = gain
    _scored(heads, prune, grow)
    heads.prune_and_grow(0.5, session.restarts)
    assert heads.keeps["blocks.0.attn"].nonzero().flatten().tolist() == sorted(
        unit[name] for name in kept
    )


# --- 3. regrowth steps as a fresh optimizer -----------------------------------------------
def _trajectory(optimizer_factory, steps_before: int, steps_after: int, restart: bool):
    """A 2x8 weight trained on a steady gradient; row 0 is masked (zero weight and gradient)
    until `steps_before`, then restarts. Returns row 0's values after each later step."""
    w = torch.nn.Parameter(torch.zeros(2, 8))
    optimizer = optimizer_factory([w])
    restarts = OptimizerRestarts(optimizer)
    g = torch.linspace(-1.0, 1.0, 16).view(2, 8)
    row0 = torch.zeros(2, 8, dtype=torch.bool)
    row0[0] = True
    for _ in range(steps_before):
        w.grad = g.masked_fill(row0, 0.0)
        optimizer.step()
        with torch.no_grad():
            w.masked_fill_(row0, 0.0)
    if restart:
        restarts.restart(w, row0)
    values = []
    for _ in range(steps_after):
        w.grad = g.clone()
        restarts.before_step()
        optimizer.step()
        restarts.after_step()
        values.append(w.detach()[0].clone())
    return values, restarts


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, fused=True),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, amsgrad=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_regrown_weights_step_as_a_fresh_optimizer(name) -> None:
    factory = OPTIMIZERS[name]
    regrown, _ = _trajectory(factory, steps_before=1500, steps_after=20, restart=True)
    fresh, _ = _trajectory(factory, steps_before=0, steps_after=20, restart=False)
    for ours, theirs in zip(regrown, fresh, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-8)
    # A fresh Adam's first step under a steady gradient is lr per weight (the stale step
    # count made it (1 - beta1) / sqrt(1 - beta2) ~ 3.2x).
    assert torch.allclose(regrown[0].abs(), torch.full((8,), 1e-2), rtol=1e-3)


def test_zeroed_moments_without_the_correction_overshoot() -> None:
    # What the correction fixes: zeroing the moments alone (the old behaviour).
    w = torch.nn.Parameter(torch.zeros(8))
    optimizer = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.0)
    for _ in range(1500):
        w.grad = torch.ones(8)
        optimizer.step()
    with torch.no_grad():
        w.zero_()
    for value in optimizer.state[w].values():
        if value.shape == w.shape:
            value.zero_()
    w.grad = torch.ones(8)
    optimizer.step()
    assert w.detach().abs().min() > 2.5 * 1e-2  # 2.8x lr


def test_regrown_positions_retire_and_round_trip() -> None:
    _, restarts = _trajectory(OPTIMIZERS["adamw"], 1500, 3, restart=True)
    (state,) = restarts.state_dict()
    assert state["index"].tolist() == list(range(8)) and state["born"].tolist() == [1500] * 8
    _, old = _trajectory(OPTIMIZERS["adamw"], 1500, 17_000, restart=True)
    assert old.state_dict() == []  # beta2^age < 1e-7: the tensor's own correction is exact


def test_positions_regrown_at_two_updates_keep_their_own_ages() -> None:
    # Two regrowths of one tensor, 300 steps apart: each position steps as a fresh optimizer
    # started at its own regrowth (one record per tensor, ages per position).
    w = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.05, fused=True)
    restarts = OptimizerRestarts(optimizer)
    g = torch.linspace(-1.0, 1.0, 12).view(3, 4)
    rows = [torch.zeros(3, 4, dtype=torch.bool) for _ in range(3)]
    for i, r in enumerate(rows):
        r[i] = True

    def step(live):
        w.grad = g * live
        restarts.before_step()
        optimizer.step()
        restarts.after_step()
        with torch.no_grad():
            w.mul_(live)

    live = rows[2].float()
    for _ in range(1200):
        step(live)
    restarts.restart(w, rows[0])
    live = live + rows[0].float()
    for _ in range(300):
        step(live)
    restarts.restart(w, rows[1])
    live = live + rows[1].float()
    for _ in range(5):
        step(live)
    assert torch.allclose(w.detach()[0], _fresh_row(g[0], 305), rtol=1e-4)
    assert torch.allclose(w.detach()[1], _fresh_row(g[1], 5), rtol=1e-4)
    assert not torch.allclose(_fresh_row(g[0], 305), _fresh_row(g[0], 5), rtol=1e-2)


def _fresh_row(g: torch.Tensor, steps: int) -> torch.Tensor:
    w = torch.nn.Parameter(torch.zeros_like(g))
    optimizer = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.05)
    for _ in range(steps):
        w.grad = g.clone()
        optimizer.step()
    return w.detach()


def test_dst_regrowth_after_a_long_run_moves_by_lr() -> None:
    """In a session: an update after 1,500 optimizer steps; every regrown weight (from 0)
    moves by lr on the next step, as a fresh AdamW would."""
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    recipe = load_recipe(
        dst_recipe(update_every="2 steps", min_update_interval="1 steps", end="100%")
    )
    session = Session.from_recipe(recipe, model, optimizer, steps_per_epoch=4)
    dst = next(m for m in session.modifiers if isinstance(m, UnstructuredDST))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(session, model, optimizer, x, y)
    for state in optimizer.state.values():  # as if the run were 1,500 steps in
        state["step"].fill_(1500)
    train_step(session, model, optimizer, x, y)  # the update after step 2
    name = "blocks.0.mlp.fc1.weight"
    target = dict(model.named_parameters())[name]
    before = target.detach().clone()
    assert dst.updates_done == 1
    regrown = dst.masks()[name] & (before == 0)
    assert regrown.sum() > 100
    train_step(session, model, optimizer, x, y)
    moved = (target.detach() - before)[regrown].abs()
    moved = moved[moved > 0]  # weights whose gradient was 0 stay at 0
    # lr x g / (|g| + eps): lr, less where |g| is near eps; never the 2.8x of a stale count.
    assert moved.max() <= 1.0001e-3
    assert (moved > 0.99e-3).float().mean() > 0.99


def test_regrown_heads_after_a_long_run_step_by_lr() -> None:
    model, optimizer, session, heads = head_session(
        compute="masked", lr=1e-3, weight_decay=0.05, mlp_density=None
    )
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(session, model, optimizer, x, y)
    old = heads.keeps["blocks.0.attn"].clone()
    a, c = old.nonzero().flatten()[0].item(), (~old).nonzero().flatten()[0].item()
    prune, grow = [1e6] * 4, [0.0] * 4
    prune[a], grow[c] = 0.0, 1e6  # the update swaps head a for head c
    _scored(heads, prune, grow)
    for state in optimizer.state.values():  # as if the run were 1,500 steps in
        state["step"].fill_(1500)
    train_step(session, model, optimizer, x, y)  # the update after step 2
    assert heads.keeps["blocks.0.attn"][c] and not heads.keeps["blocks.0.attn"][a]
    qkv = model.blocks[0].attn.qkv.weight
    rows = torch.cat([torch.arange(16) + chunk * 64 + c * 16 for chunk in range(3)])
    before = qkv.detach()[rows].clone()
    train_step(session, model, optimizer, x, y)
    step = (qkv.detach()[rows] - before * (1 - 1e-3 * 0.05)).abs()
    step = step[step > 1e-9]
    assert step.numel() > 1000
    assert step.max() <= 1.0001e-3  # a stale step count made it 2.8x
    assert (step > 0.99e-3).float().mean() > 0.95


# --- 4. updates due on a skipped step -----------------------------------------------------
def test_update_due_on_a_skipped_step_waits_for_the_next_finite_step() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recipe = load_recipe(
        dst_recipe(update_every="2 steps", min_update_interval="1 steps", end="100%")
    )
    session = Session.from_recipe(recipe, model, optimizer, steps_per_epoch=4)
    dst = next(m for m in session.modifiers if isinstance(m, UnstructuredDST))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(session, model, optimizer, x, y)
    session.batch_start()
    session.skip_step()  # the update was due after this step
    assert dst.updates_done == 0 and dst.deferred == 2
    assert not [e for e in session.events if e["event"] == "mask_update"]

    name = "blocks.0.attn.qkv.weight"
    old = dst.masks()[name].clone()
    session.batch_start()
    F.cross_entropy(model(x), y).backward()
    grad = dict(model.named_parameters())[name].grad.abs().clone()
    session.before_optimizer_step()
    optimizer.step()
    optimizer.zero_grad()
    session.after_optimizer_step()
    (event,) = [e for e in session.events if e["event"] == "mask_update"]
    assert event["step"] == 3 and event["deferred_from"] == 2
    assert dst.deferred is None and dst.updates_done == 1
    new = dst.masks()[name]
    # Grown by this step's gradient, not by index on an empty one.
    assert grad[new & ~old].min() >= grad[~new].max()
    assert session.state_dict()["modifiers"][0]["state"]["deferred"] is None
