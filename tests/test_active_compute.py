"""Training on the active sub-network is the same training as the masked one, only cheaper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit

from sparsekit import Session, Timeline, compile_recipe, load_recipe
from sparsekit.modifiers.head_prune_grow import HeadPruneGrow


def recipe(compute: str, tokens: bool = True) -> dict:
    phases = [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "3 steps",
            "min_update_interval": "1 steps",
            "end": "100%",
        },
        {
            "kind": "head_prune_grow",
            "head_density": 0.5,
            "mlp_density": 0.5,
            "update_every": "3 steps",
            "min_update_interval": "1 steps",
            "grow_batches": 2,
            "end": "100%",
        },
    ]
    if tokens:
        phases.append(
            {
                "kind": "token_select",
                "placements": [
                    {"before_block": 0, "keep_ratio": 0.75},
                    {"before_block": 2, "keep_ratio": 0.5},
                ],
                "temperature_start": 1.0,
            }
        )
    return {
        "name": "active",
        "training": {"epochs": 4, "batch_size": 8, "compute": compute, "schedule": {"warmup": 0}},
        "phases": phases,
    }


# Parallel blocks, by the timm name that builds them (its parallel block at the tiny size).
PARALLEL = {
    "scaling": "vit_base_patch16_xp_224",  # ParallelScalingBlock, separate out projections
    "diff_scaling": "vit_dpwee_patch16_reg1_gap_256",  # differential heads, fused out_proj
    "things": "vit_small_patch16_18x2_224",  # two attentions and two MLPs per block
}


def train(
    compute: str,
    steps: int = 13,
    tokens: bool = True,
    swiglu: bool = False,
    sgd=False,
    parallel: str | None = None,
):
    torch.manual_seed(0)
    extra = {"mlp_layer": __import__("timm").layers.SwiGLU} if swiglu else {}
    if parallel is not None:
        extra = {"name": PARALLEL[parallel], "reg_tokens": 1, "init_values": 0.1}
    model = tiny_vit(depth=3, num_heads=4, embed_dim=64, mlp_ratio=2.0, **extra)
    timeline = Timeline(4, 4)
    modifiers = compile_recipe(load_recipe(recipe(compute, tokens)), model, timeline)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
        if sgd
        else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    )
    session = Session(model, optimizer, modifiers, timeline)
    heads = next(m for m in modifiers if isinstance(m, HeadPruneGrow))
    data = torch.Generator().manual_seed(0)
    torch.manual_seed(1)  # the Gumbel draws
    history, active_steps = [], 0
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=data)
        y = torch.randint(0, 10, (8,), generator=data)
        session.batch_start()
        active_steps += heads._active.enabled
        F.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        session.after_optimizer_step()
        history.append({k: v.clone() for k, v in session.unit_masks().items()})
    return model, session, history, active_steps


@pytest.mark.parametrize(
    ("tokens", "swiglu", "sgd", "tolerance", "parallel"),
    [
        # SGD keeps the float rounding of the two summation orders at rounding size. Adam
        # divides tiny gradients by their own magnitude and so amplifies it, step by step.
        (True, False, True, 1e-5, None),
        (False, True, True, 1e-5, None),
        (True, False, False, 2e-4, None),
        *((True, False, True, 1e-5, kind) for kind in PARALLEL),
    ],
)
def test_active_and_masked_training_take_the_same_path(
    tokens: bool, swiglu: bool, sgd: bool, tolerance: float, parallel: str | None
) -> None:
    options = {"tokens": tokens, "swiglu": swiglu, "sgd": sgd, "parallel": parallel}
    masked, m_session, m_history, m_active = train("masked", **options)
    active, a_session, a_history, a_active = train("active", **options)
    assert m_active == 0 and a_active > 0  # the active run really ran on the sub-network
    # Same unit masks after every step (four updates), and the same unstructured masks.
    for m, a in zip(m_history, a_history, strict=True):
        assert all(torch.equal(m[name], a[name]) for name in m)
    moved = {tuple(torch.cat(list(h.values())).tolist()) for h in a_history}
    assert len(moved) > 2  # the updates really changed heads and neurons
    for name, mask in m_session.masks().items():
        assert torch.equal(a_session.masks()[name], mask)
    for (name, a), b in zip(masked.state_dict().items(), active.state_dict().values(), strict=True):
        scale = max(1.0, a.abs().max().item())  # SGD grows some tensors far past 1
        assert torch.allclose(a, b, atol=tolerance * scale, rtol=0), name


def test_inactive_units_are_untouched_by_active_steps() -> None:
    model, session, _, _ = train("active", steps=5, tokens=False)
    heads = next(m for m in session.modifiers if isinstance(m, HeadPruneGrow))
    optimizer = session.optimizer
    for g in heads.groups:
        drop = ~session.unit_masks()[g.name]
        before = g.consumer.weight[:, g.column_index(drop)].detach().clone()
        session.step = 6  # not an update step, not a grow batch: an active step
        session.batch_start()
        assert heads._active.enabled
        F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
        session.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        session.after_optimizer_step()
        assert torch.equal(g.consumer.weight[:, g.column_index(drop)], before)
        for value in optimizer.state[g.consumer.weight].values():
            if torch.is_tensor(value) and value.shape == g.consumer.weight.shape:
                assert torch.all(value[:, g.column_index(drop)] == 0)
        break


def _attention(**kwargs) -> tuple[torch.nn.Module, object]:
    from timm.layers import Attention

    from sparsekit.surgery.units import UnitGroup

    attn = Attention(32, num_heads=4, **kwargs).train()
    producers = [(attn.qkv, 3)] + ([(attn.gate, 1)] if attn.gate is not None else [])
    group = UnitGroup("attn", "heads", attn, 4, attn.head_dim, tuple(producers), attn.proj)
    return attn, group


def _mlp(kind: str) -> tuple[torch.nn.Module, object]:
    from timm.layers import Mlp, SwiGLU

    from sparsekit.surgery.units import UnitGroup

    mlp = (Mlp(32, 48) if kind == "mlp" else SwiGLU(32, 48)).train()
    producers = ((mlp.fc1, 1),) if kind == "mlp" else ((mlp.fc1_g, 1), (mlp.fc1_x, 1))
    return mlp, UnitGroup("mlp", "neurons", mlp, 48, 1, producers, mlp.fc2)


ATTENTIONS = {
    "plain": {},
    "qkv_bias": {"qkv_bias": True},
    "qk_norm": {"qk_norm": True, "qkv_bias": True, "norm_layer": torch.nn.LayerNorm},
    "gated": {"gated": True},
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("masked_keys", [False, True])
@pytest.mark.parametrize("variant", list(ATTENTIONS))
def test_active_attention_is_timms_forward(variant: str, fused: bool, masked_keys: bool) -> None:
    """The active forward copies timm's `Attention.forward`: with every head kept it must give
    what timm's own forward gives, outputs and gradients, in every supported configuration."""
    torch.manual_seed(0)
    attn, group = _attention(**ATTENTIONS[variant])
    attn.fused_attn = fused
    x = torch.randn(3, 7, 32)
    mask = None
    if masked_keys:  # what token selection passes: some keys hidden
        mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
        mask[:, ..., 2] = False
    _assert_active_is_timms(attn, group, lambda: attn(x, attn_mask=mask))


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_active_mlp_is_timms_forward(kind: str) -> None:
    torch.manual_seed(0)
    mlp, group = _mlp(kind)
    x = torch.randn(3, 7, 32)
    _assert_active_is_timms(mlp, group, lambda: mlp(x))


def _assert_active_is_timms(module, group, forward) -> None:
    """With every unit kept, the active forward gives timm's outputs and gradients."""
    from sparsekit.surgery.active import ActiveForward
    from sparsekit.surgery.units import UnitGate

    keep = torch.ones(group.units, dtype=torch.bool)
    active = ActiveForward([group], {group.name: UnitGate(group, keep)})
    active.set({group.name: keep})
    results = []
    for enabled in (False, True):
        active.enable() if enabled else active.disable()
        module.zero_grad()
        out = forward()
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
    active.disable()
    assert "forward" not in vars(module)
    (timm_out, timm_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, timm_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, timm_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
