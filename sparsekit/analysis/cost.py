"""Parameters and FLOPs of a timm ViT, plain or compacted, counted from its modules.

FLOPs are 2 x multiply-adds of the matrix products that dominate a ViT: the patch embedding,
every Linear in each block, attention scores and their weighted sum (4 N^2 x attn_dim per
block, N tokens), and the classifier head. Norms, softmax, activations and additions are left
out; they are around 1% of a ViT's work. FLOPs are per image, for dense kernels: unstructured
zeros do not reduce them (`density` reports those separately).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.surgery.geometry import patch_count, patch_embedding
from sparsekit.surgery.layouts import block_shape
from sparsekit.surgery.tokens import selection_of
from sparsekit.surgery.units import UnitGroup


@dataclass(frozen=True)
class BlockCost:
    """What one transformer block keeps and costs."""

    heads: int
    head_dim: int
    mlp_hidden: int
    tokens: int  # sequence length the block sees (after any token selection before it)
    params: int
    nonzero: int  # non-zero entries of the block's Linear weights
    linear_weights: int  # all entries of the block's Linear weights
    flops: int

    @property
    def density(self) -> float:
        return self.nonzero / self.linear_weights if self.linear_weights else 1.0


@dataclass(frozen=True)
class ModelCost:
    """Per-block costs and the totals of the whole model."""

    blocks: list[BlockCost]
    tokens: int  # sequence length after the patch embedding
    params: int
    nonzero_params: int
    flops: int


def tokens_of(model: nn.Module) -> int:
    """Sequence length the blocks see: patches plus class, distillation and register tokens."""
    return patch_count(model) + model.num_prefix_tokens


def block_tokens(model: nn.Module) -> list[int]:
    """Sequence length of each block in eval mode, after the model's token selectors."""
    selection = selection_of(model)
    if selection is None or not selection.enabled:
        return [tokens_of(model)] * len(model.blocks)
    return selection.tokens_per_block(patch_count(model))


@torch.no_grad()
def model_cost(model: nn.Module) -> ModelCost:
    tokens = block_tokens(model)
    blocks = [_block_cost(block, n) for block, n in zip(model.blocks, tokens, strict=True)]
    flops = sum(b.flops for b in blocks) + _patch_embed_flops(model) + _head_flops(model)
    flops += _scorer_flops(model, tokens)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return ModelCost(blocks, tokens_of(model), params, nonzero, flops)


def _block_cost(block: nn.Module, n: int) -> BlockCost:
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    flops = sum(2 * n * m.in_features * m.out_features for m in linears)
    heads, head_dim, hidden = block_shape(block)
    flops += 4 * n * n * heads * head_dim
    return BlockCost(
        heads=heads,
        head_dim=head_dim,
        mlp_hidden=hidden,
        tokens=n,
        params=sum(p.numel() for p in block.parameters()),
        nonzero=sum(int(torch.count_nonzero(m.weight)) for m in linears),
        linear_weights=sum(m.weight.numel() for m in linears),
        flops=flops,
    )


def _scorer_flops(model: nn.Module, tokens: list[int]) -> int:
    """Each token scorer is one Linear(dim, 1) over the tokens entering its block."""
    selection = selection_of(model)
    if selection is None or not selection.enabled:
        return 0
    entering = [tokens_of(model), *tokens[:-1]]
    return sum(2 * entering[p.before_block] * model.embed_dim for p in selection.placements)


def _patch_embed_flops(model: nn.Module) -> int:
    proj = patch_embedding(model).proj
    if not isinstance(proj, nn.Conv2d | nn.Linear):
        return 0
    # out x in x kh x kw multiply-adds for each patch (a hybrid's CNN backbone is not counted)
    return 2 * patch_count(model) * proj.weight.numel()


def _head_flops(model: nn.Module) -> int:
    heads = [getattr(model, name, None) for name in ("head", "head_dist")]
    return sum(2 * h.in_features * h.out_features for h in heads if isinstance(h, nn.Linear))


def params_removed(groups: dict[str, UnitGroup], unit_masks: dict[str, torch.Tensor]) -> int:
    """Parameters that compaction must remove, from the unit layout alone: per dropped unit,
    its rows (and biases) in every producer and its columns in the consumer."""
    removed = 0
    for name, keep in unit_masks.items():
        group = groups[name]
        per_unit = sum(
            r.chunks * group.width * (r.linear.in_features + (r.linear.bias is not None))
            for r in group.rows
        )
        per_unit += group.width * group.consumer.out_features
        per_unit += sum(
            t.chunks * t.width * (t.tensor.numel() // t.tensor.shape[t.dim])
            for t in group.tensors
            if isinstance(t.tensor, nn.Parameter)
        )
        removed += int((~keep.to(torch.bool)).sum()) * per_unit
    return removed
