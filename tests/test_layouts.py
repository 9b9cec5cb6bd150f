"""Per attention and MLP class: sparsekit's forwards are timm's, and removing units is exact.

The surgery reads timm's internals, so each class it knows is checked against timm's own
forward here: the active sub-network's forward with every unit kept (outputs and gradients),
the narrow class compaction gives a module, and compaction against the gated model.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from timm.layers import (
    Attention,
    AttentionRope,
    DiffAttention,
    GluMlp,
    Mlp,
    RotaryEmbeddingCat,
    SwiGLU,
)
from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock
from timm.models.vision_transformer_relpos import RelPosAttention
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.active import ActiveForward, check_active
from sparsekit.surgery.compact import compact_, zero_units_
from sparsekit.surgery.expand import expand_, zeroed_units
from sparsekit.surgery.layouts import head_group, neuron_group
from sparsekit.surgery.narrow_attention import narrow_class
from sparsekit.surgery.token_positions import hidden_keys
from sparsekit.surgery.units import UnitGate, UnitGroup

DIM, HEADS, TOKENS, PREFIX = 32, 4, 7, 1  # 6 patches on a 2x3 grid after one class token
LN = nn.LayerNorm


def _init(module: nn.Module) -> nn.Module:
    """Random values everywhere (timm zero-initialises EVA's and BEiT's biases and tables,
    which would hide a slicing mistake)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.train()


def _rope() -> torch.Tensor:
    rope = RotaryEmbeddingCat(DIM // HEADS, in_pixels=False, feat_shape=[2, 3])
    return rope.get_embed()


ATTENTIONS = {
    "vit": lambda: Attention(DIM, HEADS, qkv_bias=True),
    "vit_qk_norm_gated": lambda: Attention(
        DIM, HEADS, qkv_bias=True, qk_norm=True, gated=True, norm_layer=LN
    ),
    "rope_fused": lambda: AttentionRope(DIM, HEADS, num_prefix_tokens=PREFIX),
    "rope_separate_half": lambda: AttentionRope(
        DIM, HEADS, qkv_fused=False, rotate_half=True, qk_norm=True, norm_layer=LN
    ),
    "rope_per_head": lambda: AttentionRope(DIM, HEADS, num_prefix_tokens=PREFIX),
    "eva_fused": lambda: EvaAttention(DIM, HEADS, scale_norm=False, num_prefix_tokens=PREFIX),
    "eva_bias_separate_gated": lambda: EvaAttention(
        DIM, HEADS, qkv_bias_separate=True, scale_norm=False, gated=True
    ),
    "eva_separate": lambda: EvaAttention(DIM, HEADS, qkv_fused=False, scale_norm=False),
    "beit": lambda: BeitAttention(DIM, HEADS, qkv_bias=True, window_size=(2, 3)),
    "relpos_table": lambda: RelPosAttention(
        DIM,
        HEADS,
        qkv_bias=True,
        rel_pos_cls=lambda num_heads, **kw: RelPosBias(
            (2, 3), num_heads, prefix_tokens=PREFIX, **kw
        ),
    ),
    "beit_shared_bias": lambda: BeitAttention(DIM, HEADS, qkv_bias=True),
    "relpos_shared_bias": lambda: RelPosAttention(DIM, HEADS),
    "diff": lambda: DiffAttention(DIM, HEADS, qkv_bias=True, qk_norm=True),
    "diff_dual_lambda": lambda: DiffAttention(DIM, HEADS, dual_lambda=True),
    "relpos_mlp": lambda: RelPosAttention(
        DIM,
        HEADS,
        rel_pos_cls=lambda num_heads, **kw: RelPosMlp(
            (2, 3), num_heads, prefix_tokens=PREFIX, **kw
        ),
    ),
}
ROPE = {"rope_fused", "rope_separate_half", "eva_fused", "eva_bias_separate_gated", "eva_separate"}


def _hidden_keys() -> torch.Tensor:
    """What token selection shares into a relative-position block: key 2 of 7 hidden."""
    alive = torch.ones(3, TOKENS, dtype=torch.bool)
    alive[:, 2] = False
    return hidden_keys(alive, torch.float32)


def _attention(kind: str):
    attn = _init(ATTENTIONS[kind]())
    group = head_group(SimpleNamespace(), "blocks.0.attn", SimpleNamespace(attn=attn))
    kwargs = {"rope": _rope()} if kind in ROPE else {}
    if kind == "rope_per_head":  # rope_mixed: each head rotates by its own learned frequencies
        kwargs = {"rope": torch.randn(HEADS, TOKENS - PREFIX, 2 * (DIM // HEADS))}
    if kind == "beit_shared_bias":
        kwargs = {"shared_rel_pos_bias": _hidden_keys()}
    if kind == "relpos_shared_bias":
        kwargs = {"shared_rel_pos": _hidden_keys()}
    return attn, group, kwargs


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, **kwargs):
    module.zero_grad()
    torch.manual_seed(0)  # RelPosMlp's dropout draws alike in both forwards
    out = module(x, **kwargs)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_same(a, b, rtol=1e-5, atol=1e-6) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_active_attention_forward_is_timms(kind: str, fused: bool) -> None:
    """Every head kept, the active forward gives timm's outputs and gradients."""
    attn, group, kwargs = _attention(kind)
    attn.fused_attn = fused
    x = torch.randn(3, TOKENS, DIM)
    timm_result = _outputs_and_grads(attn, x, **kwargs)
    keep = torch.ones(HEADS, dtype=torch.bool)
    active = ActiveForward([group], {group.name: UnitGate(group, keep)})
    active.set({group.name: keep})
    active.enable()
    ours = _outputs_and_grads(attn, x, **kwargs)
    active.disable()
    assert "forward" not in vars(attn)
    _assert_same(ours, timm_result)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "kind",
    [k for k in ATTENTIONS if "vit" not in k and k not in ("rope_fused", "rope_separate_half")],
)
def test_narrow_class_forward_is_timms(kind: str, fused: bool) -> None:
    """The forward compaction gives a module is timm's while every head is kept."""
    attn, _, kwargs = _attention(kind)
    attn.fused_attn = fused
    x = torch.randn(3, TOKENS, DIM)
    timm_result = _outputs_and_grads(attn, x, **kwargs)
    attn.__class__ = narrow_class(type(attn))
    _assert_same(_outputs_and_grads(attn, x, **kwargs), timm_result)


def test_classes_without_an_active_forward_refuse_active_compute() -> None:
    attn = _init(Attention(DIM, HEADS))
    group = head_group(SimpleNamespace(), "blocks.0.attn", SimpleNamespace(attn=attn))
    attn.__class__ = type("OtherAttention", (Attention,), {})
    with pytest.raises(SparsekitError, match="OtherAttention.*compute: masked"):
        check_active([group])
    check_active([_attention(k)[1] for k in ATTENTIONS])


@pytest.mark.parametrize("kind", [k for k in ATTENTIONS if k != "rope_per_head"])
def test_compacted_attention_equals_the_gated_one(kind: str) -> None:
    """Heads 1 and 3 gated off at full size compute what the attention cut to heads 0 and 2
    computes, and the cut module keeps its class's state-dict keys."""
    attn, group, kwargs = _attention(kind)
    attn.eval()
    x = torch.randn(3, TOKENS, DIM)
    keep = torch.tensor([True, False, True, False])
    gate = UnitGate(group, keep)
    with torch.no_grad():
        gated = attn(x, **kwargs)
    gate.remove()
    keys = set(attn.state_dict())
    compact_(SimpleNamespace(), {group.name: keep}, groups={group.name: group})
    with torch.no_grad():
        torch.testing.assert_close(attn(x, **kwargs), gated, rtol=1e-5, atol=1e-6)
    assert set(attn.state_dict()) == keys
    assert attn.num_heads == 2
    again = head_group(SimpleNamespace(), "blocks.0.attn", SimpleNamespace(attn=attn))
    assert again.units == 2 and again.width == group.width


def test_zeroed_heads_include_their_tables_and_biases() -> None:
    attn, group, _ = _attention("beit")
    keep = torch.tensor([True, False, True, True])
    zero_units_({group.name: group}, {group.name: keep})
    assert torch.all(attn.relative_position_bias_table[:, 1] == 0)
    assert torch.all(attn.relative_position_bias_table[:, 0] != 0)
    width = DIM // HEADS
    assert torch.all(attn.q_bias[width : 2 * width] == 0) and torch.all(attn.q_bias[:width] != 0)


MLPS = {
    "mlp": lambda: Mlp(DIM, 48),
    "swiglu": lambda: SwiGLU(DIM, 48),
    "glu_mlp": lambda: GluMlp(DIM, 96, act_layer=nn.SiLU, gate_last=False),
    "glu_mlp_gate_last": lambda: GluMlp(DIM, 96, act_layer=nn.Sigmoid),
}


@pytest.mark.parametrize("kind", list(MLPS))
def test_mlp_forwards_and_compaction(kind: str) -> None:
    mlp = _init(MLPS[kind]())
    group = neuron_group("blocks.0.mlp", SimpleNamespace(mlp=mlp))
    assert group.units == 48
    x = torch.randn(3, TOKENS, DIM)
    timm_result = _outputs_and_grads(mlp, x)
    keep = torch.ones(48, dtype=torch.bool)
    active = ActiveForward([group], {group.name: UnitGate(group, keep)})
    active.set({group.name: keep})
    active.enable()
    ours = _outputs_and_grads(mlp, x)
    active.disable()
    _assert_same(ours, timm_result)
    mlp.eval()
    keep = torch.rand(48, generator=torch.Generator().manual_seed(0)) < 0.5
    gate = UnitGate(group, keep)
    with torch.no_grad():
        gated = mlp(x)
    gate.remove()
    compact_(SimpleNamespace(), {group.name: keep}, groups={group.name: group})
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), gated, rtol=1e-5, atol=1e-6)
    assert mlp.fc2.in_features == int(keep.sum())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Attention(DIM, HEADS, scale_norm=True, norm_layer=LN), "scale_norm"),
        (lambda: EvaAttention(DIM, HEADS, norm_layer=LN), "scale_norm"),
        (lambda: nn.MultiheadAttention(DIM, HEADS), "does not know"),
    ],
)
def test_heads_that_cannot_be_removed_exactly_are_refused(build, message: str) -> None:
    with pytest.raises(SparsekitError, match=message):
        head_group(SimpleNamespace(), "blocks.0.attn", SimpleNamespace(attn=build()))


def test_model_level_refusals() -> None:
    attn = EvaAttention(DIM, HEADS, scale_norm=False)
    with pytest.raises(SparsekitError, match="rope_mixed"):
        head_group(SimpleNamespace(rope_mixed=True), "blocks.0.attn", SimpleNamespace(attn=attn))
    rope = AttentionRope(DIM, HEADS)
    with pytest.raises(SparsekitError, match="NaFlexViT's per-head rotary"):
        head_group(SimpleNamespace(rope_is_mixed=True), "blocks.0.attn", SimpleNamespace(attn=rope))
    beit = BeitAttention(DIM, HEADS)
    with pytest.raises(SparsekitError, match="shared by every block"):
        head_group(SimpleNamespace(rel_pos_bias=nn.Identity()), "b", SimpleNamespace(attn=beit))
    with pytest.raises(SparsekitError, match="scale_mlp"):
        neuron_group("b", SimpleNamespace(mlp=Mlp(DIM, 48, norm_layer=LN)))


def test_grouped_query_attention_prunes_key_value_groups() -> None:
    """Sapiens2's grouped-query attention: a unit is a key/value head with its query heads.
    The active forward is timm's, and cutting a group equals gating it off."""
    attn = _init(AttentionRope(DIM, HEADS, qkv_fused=False, num_kv_heads=2, qkv_bias=True))
    group = head_group(SimpleNamespace(), "blocks.0.attn", SimpleNamespace(attn=attn))
    assert (group.units, group.width) == (2, 2 * DIM // HEADS)
    x, kwargs = torch.randn(3, TOKENS, DIM), {"rope": _rope()}
    timm_result = _outputs_and_grads(attn, x, **kwargs)
    keep = torch.ones(2, dtype=torch.bool)
    active = ActiveForward([group], {group.name: UnitGate(group, keep)})
    active.set({group.name: keep})
    active.enable()
    ours = _outputs_and_grads(attn, x, **kwargs)
    active.disable()
    _assert_same(ours, timm_result)
    attn.eval()
    keep = torch.tensor([False, True])
    gate = UnitGate(group, keep)
    with torch.no_grad():
        gated = attn(x, **kwargs)
    gate.remove()
    compact_(SimpleNamespace(), {group.name: keep}, groups={group.name: group})
    assert (attn.num_heads, attn.num_kv_heads, attn.k_proj.out_features) == (2, 1, DIM // HEADS)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, **kwargs), gated, rtol=1e-5, atol=1e-6)


# Parallel scaling blocks: one in_proj ([hidden | q | k | v]) feeds the heads and the neurons,
# and a fused out_proj ([heads | hidden]) consumes both.
SCALING_BLOCKS = {
    "scaling_mlp_bias": lambda: ParallelScalingBlock(DIM, HEADS, mlp_ratio=1.5),
    "scaling_fused_out_qk_norm": lambda: ParallelScalingBlock(
        DIM, HEADS, mlp_ratio=1.5, qkv_bias=True, qk_norm=True, fuse_out_proj=True, init_values=0.5
    ),
    "diff_scaling": lambda: DiffParallelScalingBlock(DIM, HEADS, mlp_ratio=1.5, qk_norm=True),
    "diff_scaling_dual_lambda": lambda: DiffParallelScalingBlock(
        DIM, HEADS, mlp_ratio=1.5, qkv_bias=True, dual_lambda=True
    ),
}
HIDDEN = 48


def _scaling_groups(block: nn.Module) -> dict[str, UnitGroup]:
    return {
        "blocks.0.attn": head_group(SimpleNamespace(), "blocks.0.attn", block),
        "blocks.0.mlp": neuron_group("blocks.0.mlp", block),
    }


def _scaling_block(kind: str):
    block = _init(SCALING_BLOCKS[kind]())
    return block, list(_scaling_groups(block).values())


def _scaling_keeps() -> dict[str, torch.Tensor]:
    neurons = torch.rand(HIDDEN, generator=torch.Generator().manual_seed(0)) < 0.5
    return {"blocks.0.attn": torch.tensor([False, True, True, False]), "blocks.0.mlp": neurons}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", list(SCALING_BLOCKS))
def test_parallel_scaling_block_forwards_are_timms(kind: str, fused: bool) -> None:
    """Every unit kept, the active forward and the narrow class give timm's outputs and
    gradients; with units dropped, the active forward is the gated one, gradients included."""
    block, groups = _scaling_block(kind)
    block.fused_attn = fused
    assert [(g.units, g.width) for g in groups] == [
        (HEADS, DIM // HEADS),
        (HIDDEN, 1),
    ]
    x = torch.randn(3, TOKENS, DIM)
    timm_result = _outputs_and_grads(block, x)
    every = {g.name: torch.ones(g.units, dtype=torch.bool) for g in groups}
    # All kept; some dropped of both kinds; heads alone or neurons alone gated (the other whole).
    for keeps, gated_groups in (
        (every, groups),
        (_scaling_keeps(), groups),
        (_scaling_keeps(), groups[:1]),
        (_scaling_keeps(), groups[1:]),
    ):
        gates = {g.name: UnitGate(g, keeps[g.name]) for g in gated_groups}
        gated = _outputs_and_grads(block, x)
        active = ActiveForward(gated_groups, gates)
        active.set(keeps)
        active.enable()
        ours = _outputs_and_grads(block, x)
        active.disable()
        for gate in gates.values():
            gate.remove()
        _assert_same(ours, gated)
        assert "forward" not in vars(block)
    block.__class__ = narrow_class(type(block))
    _assert_same(_outputs_and_grads(block, x), timm_result)
    check_active(groups)


@pytest.mark.parametrize("kind", list(SCALING_BLOCKS))
def test_compacted_parallel_scaling_block_equals_the_gated_one(kind: str) -> None:
    """Heads and neurons cut from the shared in_proj and out_proj at once compute what the
    gated block computes; the cut block keeps its state-dict keys, reads back at its new
    size, and expands back to full size with the same function."""
    block, groups = _scaling_block(kind)
    block.eval()
    x = torch.randn(3, TOKENS, DIM)
    keeps = _scaling_keeps()
    gates = [UnitGate(g, keeps[g.name]) for g in groups]
    with torch.no_grad():
        gated = block(x)
    for gate in gates:
        gate.remove()
    zeroed = copy.deepcopy(block)
    keys = set(block.state_dict())
    compact_(SimpleNamespace(), keeps, groups={g.name: g for g in groups})
    with torch.no_grad():
        torch.testing.assert_close(block(x), gated, rtol=1e-5, atol=1e-6)
    assert set(block.state_dict()) == keys
    kept_heads, kept_neurons = (int(k.sum()) for k in keeps.values())
    width = DIM // HEADS
    assert block.num_heads == kept_heads
    assert block.in_split == [kept_neurons] + [kept_heads * width] * 3
    assert block.in_proj.out_features == kept_neurons + 3 * kept_heads * width
    compacted = _scaling_groups(block)
    assert [g.units for g in compacted.values()] == [kept_heads, kept_neurons]
    # Zeroed in place, the dropped units compute nothing and read back as dropped.
    zero_units_(_scaling_groups(zeroed), keeps)
    with torch.no_grad():
        torch.testing.assert_close(zeroed(x), gated, rtol=1e-5, atol=1e-6)
    read = zeroed_units(list(_scaling_groups(zeroed).values()))
    assert all(torch.equal(read[n], keeps[n]) for n in keeps)
    # Expanded into a fresh full-size block: the kept units first, the same function.
    expanded = _init(SCALING_BLOCKS[kind]()).eval()
    placed = expand_(expanded, block, _scaling_groups(expanded), compacted)
    assert [int(k.sum()) for k in placed.values()] == [kept_heads, kept_neurons]
    with torch.no_grad():
        torch.testing.assert_close(expanded(x), gated, rtol=1e-5, atol=1e-6)
