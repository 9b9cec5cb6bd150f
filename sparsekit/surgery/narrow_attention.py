"""Forwards for attentions that keep fewer heads than their block is wide.

timm's `EvaAttention`, BEiT's `Attention`, `RelPosAttention`, `DiffAttention` and the parallel
scaling blocks reshape the heads' output to the block's width (`reshape(B, N, C)` with C the
input's), which holds only while every head is kept. Compaction gives such a module its narrow
class below: the same module, parameters and state-dict keys, whose forward is timm's with the
heads' output reshaped to `num_heads x head_dim`. `tests/test_layouts.py` checks each against timm's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, DiffAttention, apply_rot_embed_cat
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock
from timm.models.vision_transformer_relpos import RelPosAttention
from torch import nn


def attend(attn: nn.Module, q, k, v, bias=None, is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention as timm's attention classes compute it, fused or not,
    with `bias` an additive or boolean mask; the heads' outputs are concatenated at their own
    width. The active sub-network's forward (`active`) shares it."""
    batch, _, length, _ = q.shape
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            dropout_p=attn.attn_drop.p if attn.training else 0.0,
            is_causal=is_causal,
        )
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        scores = maybe_add_mask(scores, resolve_self_attn_mask(length, scores, bias, is_causal))
        x = attn.attn_drop(scores.softmax(dim=-1)) @ v
    return x.transpose(1, 2).reshape(batch, length, -1)  # heads x head width


def score_bias(attn: nn.Module, options: dict) -> torch.Tensor | None:
    """What the attention adds to its scores, as each timm class combines it from its forward's
    arguments (`options`, by name): BEiT's own table plus the bias its block shares in; the
    relative-position ViTs' own `rel_pos`, else the shared bias; any other class, its key mask.
    The active sub-network's forward (`active`) slices it to the kept heads."""
    if hasattr(attn, "relative_position_bias_table"):  # BEiT
        own = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        shared = options.get("shared_rel_pos_bias")
        return shared if own is None else own if shared is None else own + shared
    if hasattr(attn, "rel_pos"):  # RelPosAttention
        return (
            attn.rel_pos.get_bias() if attn.rel_pos is not None else options.get("shared_rel_pos")
        )
    return options.get("attn_mask")


def _fused_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The qkv projection with EVA's and BEiT's separate q/k/v biases, as timm adds them."""
    if attn.q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + bias
    return F.linear(x, weight=attn.qkv.weight, bias=bias)


class NarrowRopeAttention(AttentionRope):
    """timm's `AttentionRope` under per-head rotary embeddings (`rope_mixed`) once it keeps
    fewer heads: the embeddings come for all of the block's heads, kept ones first."""

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
        return super().forward(x, first_heads(rope, self.num_heads), attn_mask, is_causal)


def first_heads(rope: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """Per-head rotary embeddings (..., heads, tokens, dim) of the first `heads` heads;
    embeddings shared by every head (tokens, dim) as they are."""
    if rope is None or rope.ndim < 3 or rope.shape[-3] <= heads:
        return rope
    return rope[..., :heads, :, :]


class NarrowEvaAttention(EvaAttention):
    """`EvaAttention` with fewer heads than the block's width."""

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
        batch, length, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            qkv = _fused_qkv(self, x).reshape(batch, length, 3, self.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                proj(x).reshape(batch, length, self.num_heads, -1).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat(
                [q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2
            ).type_as(v)
            k = torch.cat(
                [k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2
            ).type_as(v)
        x = self.norm(attend(self, q, k, v, attn_mask, is_causal))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class NarrowBeitAttention(BeitAttention):
    """BEiT's `Attention` with fewer heads than the block's width."""

    def forward(self, x, shared_rel_pos_bias=None):
        batch, length, _ = x.shape
        qkv = _fused_qkv(self, x).reshape(batch, length, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = score_bias(self, {"shared_rel_pos_bias": shared_rel_pos_bias})
        return self.proj_drop(self.proj(attend(self, q, k, v, bias)))


class NarrowRelPosAttention(RelPosAttention):
    """`RelPosAttention` with fewer heads than the block's width."""

    def forward(self, x, shared_rel_pos=None):
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = score_bias(self, {"shared_rel_pos": shared_rel_pos})
        return self.proj_drop(self.proj(attend(self, q, k, v, bias)))


def differential_heads(attn: nn.Module, qkv: torch.Tensor, attn_mask=None, is_causal=False):
    """`DiffAttention`'s heads from its qkv projection `qkv` (of however many heads it holds),
    up to their concatenated output: each head's two softmax maps, subtracted, its sub-norm."""
    batch, length, _ = qkv.shape
    width = attn.head_dim
    heads = qkv.shape[-1] // (6 * width)
    q, k, v = qkv.chunk(3, dim=2)
    q = q.reshape(batch, length, 2 * heads, width).transpose(1, 2)
    k = k.reshape(batch, length, 2 * heads, width).transpose(1, 2)
    v = v.reshape(batch, length, heads, 2 * width).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    lambda_full = attn._compute_lambda().type_as(q)
    if attn.fused_attn:
        q1, q2 = q.reshape(batch, heads, 2, length, width).unbind(2)
        k1, k2 = k.reshape(batch, heads, 2, length, width).unbind(2)
        dropout = attn.attn_drop_p if attn.training else 0.0
        first, second = (
            F.scaled_dot_product_attention(
                a, b, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal
            )
            for a, b in ((q1, k1), (q2, k2))
        )
        x = first - lambda_full * second
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        bias = resolve_self_attn_mask(length, scores, attn_mask, is_causal=is_causal)
        scores = attn.attn_drop(maybe_add_mask(scores, bias).softmax(dim=-1))
        scores = scores.view(batch, heads, 2, length, length)
        x = (scores[:, :, 0] - lambda_full * scores[:, :, 1]) @ v
    x = attn.sub_norm(x) * (1 - attn.lambda_init)
    return x.transpose(1, 2).reshape(batch, length, -1)


class NarrowDiffAttention(DiffAttention):
    """timm's `DiffAttention` with fewer heads than the block's width."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        x = self.norm(differential_heads(self, self.qkv(x), attn_mask, is_causal))
        return self.proj_drop(self.proj(x))


def scaling_block(
    block: nn.Module,
    x: torch.Tensor,
    attn_mask=None,
    is_causal: bool = False,
    in_proj=None,
    out_proj=None,
) -> torch.Tensor:
    """The forward of timm's `ParallelScalingBlock` and `DiffParallelScalingBlock` at the
    heads and MLP width they hold, in timm's order of operations. `in_proj(y)` gives the
    [hidden | q | k | v] projection, the hidden width and the MLP bias, `out_proj(heads,
    hidden)` the block's output projection: by default the block's own, while the active
    sub-network's forward (`active`) passes the kept units' slices."""
    batch, length, _ = x.shape
    y = block.in_norm(x)
    if in_proj is None:
        y, hidden, mlp_bias = block.in_proj(y), block.in_split[0], block.mlp_bias
    else:
        y, hidden, mlp_bias = in_proj(y)
    x_mlp, qkv = y[..., :hidden], y[..., hidden:]
    if mlp_bias is not None:
        x_mlp = x_mlp + mlp_bias
    if hasattr(block, "lambda_init"):  # differential heads
        x_attn = differential_heads(block, qkv, attn_mask, is_causal)
    else:
        heads = qkv.shape[-1] // (3 * block.head_dim)
        q, k, v = (
            t.reshape(batch, length, heads, block.head_dim).transpose(1, 2)
            for t in qkv.chunk(3, dim=-1)
        )
        x_attn = attend(block, block.q_norm(q), block.k_norm(k), v, attn_mask, is_causal)
    x_mlp = block.mlp_drop(block.mlp_act(x_mlp))
    if out_proj is not None:
        y = out_proj(x_attn, x_mlp)
    elif block.out_proj is not None:
        y = block.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
    else:
        y = block.attn_out_proj(x_attn) + block.mlp_out_proj(x_mlp)
    return x + block.drop_path(block.ls(y))


class NarrowParallelScalingBlock(ParallelScalingBlock):
    """timm's `ParallelScalingBlock` with fewer heads than the block's width."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        return scaling_block(self, x, attn_mask, is_causal)


class NarrowDiffParallelScalingBlock(DiffParallelScalingBlock):
    """timm's `DiffParallelScalingBlock` with fewer heads than the block's width."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        return scaling_block(self, x, attn_mask, is_causal)


_NARROW: dict[type, type] = {
    AttentionRope: NarrowRopeAttention,
    EvaAttention: NarrowEvaAttention,
    BeitAttention: NarrowBeitAttention,
    RelPosAttention: NarrowRelPosAttention,
    DiffAttention: NarrowDiffAttention,
    ParallelScalingBlock: NarrowParallelScalingBlock,
    DiffParallelScalingBlock: NarrowDiffParallelScalingBlock,
}


def narrow_class(cls: type) -> type:
    """The narrow class of a timm attention class (itself when it is one already)."""
    return cls if cls in _NARROW.values() else _NARROW[cls]
