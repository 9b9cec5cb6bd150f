"""The SViTE paper's own FLOPs (and parameter) convention, so its figures can be reproduced.

"Chasing Sparsity in Vision Transformers" (NeurIPS 2021) prices a sparse model by what its
masks would save on ideal hardware, not by what a dense kernel runs:

- FLOPs are multiply-accumulates (MACs), per image: DeiT's convention, under which the dense
  DeiT-Tiny, -Small and -Base at 224 px cost 1.3, 4.6 and 17.6 G;
- every Linear layer (and the patch embedding) costs `tokens x non-zero weights`: unstructured
  zeros are saved, and so are the rows and columns of pruned units;
- a pruned MLP neuron removes its fc1 row and its fc2 column;
- a pruned head removes only its q, k and v rows (the reference masks nothing else): the
  columns of `proj` that read it stay, and so do its attention scores and weighted sum, which
  are counted for every head of the dense model, `2 x tokens^2 x heads x head_dim` per block;
- dropped tokens are removed: a block costs what its kept tokens (class token included) cost;
  the patch embedding runs on every patch, the token scorer on the tokens it scores, and the
  classifier on the one pooled token;
- norms, softmax, activations, biases and additions are not counted.

`paper_cost` is the arithmetic on plain numbers (`PaperLayout`); `paper_layout` reads those
numbers from a model (compacted or masked, with its token selectors) and the dense model it
was built from, which gives the layout of the heads before pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.analysis.cost import block_tokens, tokens_of
from sparsekit.errors import SparsekitError
from sparsekit.surgery.geometry import patch_count, patch_embedding
from sparsekit.surgery.layouts import block_shape, head_groups
from sparsekit.surgery.tokens import selection_of
from sparsekit.surgery.units import UnitGroup


@dataclass(frozen=True)
class PaperBlockLayout:
    """What the paper's count needs from one transformer block."""

    tokens: int  # sequence length the block sees, class token included
    heads: int  # heads of the dense block: all of them keep their attention products
    head_dim: int
    pruned_heads: int  # heads whose q, k and v rows are gone (compacted away, or all zero)
    linear_nonzero: int  # non-zero weights of every Linear layer of the block, as it is
    proj_out: int  # output features of `proj`: a pruned head's proj columns count again


@dataclass(frozen=True)
class PaperLayout:
    """What the paper's count needs from the whole model."""

    blocks: list[PaperBlockLayout]
    patches: int  # patches the patch embedding projects
    patch_embed_nonzero: int  # non-zero weights of the patch embedding (one patch's MACs)
    head_nonzero: int  # non-zero weights of the classifier head(s), applied to one token
    scorer_macs: int  # token scorers: tokens scored x non-zero scorer weights
    nonzero_params: int  # parameters the masks keep (zero weights removed, see _kept_params)


@dataclass(frozen=True)
class PaperBlockCost:
    tokens: int
    heads: int  # heads whose q, k and v rows remain
    linear_macs: int  # the block's Linear layers, pruned heads' proj columns included
    attention_macs: int  # scores and weighted sum of every dense head
    macs: int


@dataclass(frozen=True)
class PaperCost:
    """The paper's figures: MACs per image, by part, and non-zero parameters."""

    blocks: list[PaperBlockCost]
    patch_embed_macs: int
    head_macs: int
    scorer_macs: int
    macs: int
    params: int  # non-zero parameters, a pruned head's proj columns counted as kept


def paper_cost(layout: PaperLayout) -> PaperCost:
    """Price `layout` by the paper's convention (see the module docstring)."""
    blocks = []
    for b in layout.blocks:
        linear = b.tokens * (b.linear_nonzero + b.proj_out * b.head_dim * b.pruned_heads)
        attention = 2 * b.tokens * b.tokens * b.heads * b.head_dim
        blocks.append(
            PaperBlockCost(
                b.tokens, b.heads - b.pruned_heads, linear, attention, linear + attention
            )
        )
    patch_embed = layout.patches * layout.patch_embed_nonzero
    macs = sum(b.macs for b in blocks) + patch_embed + layout.head_nonzero + layout.scorer_macs
    proj_columns = sum(b.proj_out * b.head_dim * b.pruned_heads for b in layout.blocks)
    return PaperCost(
        blocks=blocks,
        patch_embed_macs=patch_embed,
        head_macs=layout.head_nonzero,
        scorer_macs=layout.scorer_macs,
        macs=macs,
        params=layout.nonzero_params + proj_columns,
    )


@torch.no_grad()
def paper_layout(model: nn.Module, dense: nn.Module) -> PaperLayout:
    """The paper's inputs read from `model` (a compacted or a masked timm ViT, with its token
    selectors) and `dense`, the same architecture unpruned (the head layout before pruning)."""
    tokens = block_tokens(model)
    heads = _head_groups_by_block(model)
    blocks = [
        _block_layout(block, dense_block, n, heads.get(i, []))
        for i, (block, dense_block, n) in enumerate(
            zip(model.blocks, dense.blocks, tokens, strict=True)
        )
    ]
    proj = patch_embedding(model).proj
    patch_embed = _nonzero(proj.weight) if isinstance(proj, nn.Conv2d) else 0
    heads = [getattr(model, name, None) for name in ("head", "head_dist")]
    head = sum(_nonzero(h.weight) for h in heads if isinstance(h, nn.Linear))
    return PaperLayout(
        blocks=blocks,
        patches=patch_count(model),
        patch_embed_nonzero=patch_embed,
        head_nonzero=head,
        scorer_macs=_scorer_macs(model, tokens),
        nonzero_params=_kept_params(model),
    )


def paper_model_cost(model: nn.Module, dense: nn.Module) -> PaperCost:
    """`paper_cost(paper_layout(model, dense))`."""
    return paper_cost(paper_layout(model, dense))


def _block_layout(
    block: nn.Module, dense_block: nn.Module, tokens: int, groups: list[UnitGroup]
) -> PaperBlockLayout:
    """One block's inputs; `groups` are its attentions' head groups (two in a block with
    parallel attentions), none where sparsekit prunes no head of the model."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    heads, head_dim, _ = block_shape(dense_block)
    live = sum(_live_heads(g, head_dim) for g in groups) if groups else heads
    return PaperBlockLayout(
        tokens=tokens,
        heads=heads,
        head_dim=head_dim,
        pruned_heads=heads - live,
        linear_nonzero=sum(_nonzero(m.weight) for m in linears),
        proj_out=groups[0].consumer.out_features if groups else 0,
    )


def _head_groups_by_block(model: nn.Module) -> dict[int, list[UnitGroup]]:
    """The model's head groups by block index; none for a model whose heads sparsekit cannot
    prune (`layouts` refuses them), which then prunes no head."""
    try:
        groups = head_groups(model)
    except SparsekitError:
        return {}
    by_block: dict[int, list[UnitGroup]] = {}
    for group in groups:  # "blocks.3.attn", "blocks.3.attns.1.attn"
        by_block.setdefault(int(group.name.split(".")[1]), []).append(group)
    return by_block


def _live_heads(group: UnitGroup, head_dim: int) -> int:
    """Heads of `group` with any non-zero q, k or v weight: a head masked at full size (all its
    rows zero) is as pruned as one compaction removed. A unit of grouped-query attention is
    its query heads (`group.width` of `head_dim`)."""
    return int(group.live_rows(biases=False).sum()) * group.width // head_dim


def _scorer_macs(model: nn.Module, tokens: list[int]) -> int:
    """Each token scorer is a Linear(dim, 1) over the tokens entering its block."""
    selection = selection_of(model)
    if selection is None or not selection.enabled:
        return 0
    entering = [tokens_of(model), *tokens[:-1]]
    scorers = model.token_selectors
    return sum(
        entering[p.before_block] * _nonzero(scorers[str(p.before_block)].score.weight)
        for p in selection.placements
    )


def _kept_params(model: nn.Module) -> int:
    """Parameters that the masks keep: every entry of a Linear or Conv2d weight that is not
    zero, each bias entry whose weight row is not all zero (a dead row goes with its bias), and
    all other parameters (norms, embeddings, tokens), whatever their values."""
    kept = 0
    weighted: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        w = module.weight
        weighted.add(id(w))
        kept += _nonzero(w)
        if module.bias is not None:
            weighted.add(id(module.bias))
            kept += int(w.reshape(w.shape[0], -1).ne(0).any(dim=1).sum())
    return kept + sum(p.numel() for p in model.parameters() if id(p) not in weighted)


def _nonzero(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t))
