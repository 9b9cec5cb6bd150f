"""What dropping or gathering tokens does to a block's position-dependent attention inputs.

Rotary embeddings (EVA's blocks take them as `rope`) and relative position biases (BEiT's
per-block table and shared bias, the relative-position ViTs' `rel_pos` and `shared_rel_pos`)
are made for the full grid. While training masks tokens the sequence keeps its length: only the
dropped keys must be hidden, by an attention mask where a block takes one, else by an additive
mask on its relative position bias. Once tokens are gathered each kept token must keep its own
position: the rotary embeddings of the kept patches, and the rows and columns of the bias of the
kept tokens, per sample. Either way the attention computes exactly what it computes on the full
sequence with the dropped tokens left out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

# The keyword a relative-position block passes its shared bias under (BEiT, vit_relpos_*).
SHARED_BIAS = ("shared_rel_pos_bias", "shared_rel_pos")


@dataclass(frozen=True)
class BlockPositions:
    """How one block takes positions: `mask_arg` is the keyword that hides dropped keys
    (`attn_mask`, or the block's shared-bias keyword), `own_bias` the module whose relative
    position bias the block computes itself, and its method name."""

    mask_arg: str | None
    own_bias: tuple[nn.Module, str] | None


def block_positions(block: nn.Module) -> BlockPositions:
    """What a block takes: an attention mask (timm's, EVA's blocks) or a shared relative
    position bias (BEiT's and the relative-position ViTs' blocks), and its own bias if any."""
    parameters = inspect.signature(block.forward).parameters
    arg = next((a for a in ("attn_mask", *SHARED_BIAS) if a in parameters), None)
    attn = getattr(block, "attn", None)
    own = None
    if getattr(attn, "relative_position_bias_table", None) is not None:  # BEiT
        own = (attn, "_get_rel_pos_bias")
    elif getattr(attn, "rel_pos", None) is not None:  # RelPosAttention
        own = (attn.rel_pos, "get_bias")
    return BlockPositions(arg, own)


def hidden_keys(alive: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask (batch, 1, 1, keys): 0 for kept tokens, -inf for dropped."""
    mask = torch.zeros(alive.shape[0], 1, 1, alive.shape[1], dtype=dtype, device=alive.device)
    return mask.masked_fill(~alive[:, None, None, :], float("-inf"))


def kept_rope(rope: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings at the kept patches' grid positions (`kept`, batch x patches), per
    sample. Embeddings are (patches, dim), or per head (heads, patches, dim) or (batch, heads,
    patches, dim); the result broadcasts over heads as the attention applies it."""
    if rope.ndim == 2:
        return rope[kept].unsqueeze(1)  # batch, 1, kept, dim
    if rope.ndim == 3:
        return rope[:, kept].transpose(0, 1)  # batch, heads, kept, dim
    index = kept[:, None, :, None].expand(-1, rope.shape[1], -1, rope.shape[-1])
    return rope.expand(kept.shape[0], -1, -1, -1).gather(2, index)


def kept_bias(bias: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A relative position bias (1 or batch, heads, queries, keys, over the full sequence)
    at the rows and columns of the kept tokens (`tokens`, batch x kept, prefix included)."""
    batch, count = tokens.shape
    bias = bias.expand(batch, *bias.shape[1:])
    heads, length = bias.shape[1], bias.shape[-1]
    rows = tokens[:, None, :, None].expand(-1, heads, -1, length)
    bias = bias.gather(2, rows)
    return bias.gather(3, tokens[:, None, None, :].expand(-1, heads, count, -1))
