"""Learnable token selection (SViTE+): keep the most useful patch tokens before chosen blocks.

A `TokenScorer` (one Linear from the embedding to a score, as in the reference) sits before a
block. In eval mode it keeps the `k` best-scoring patch tokens and *gathers* them: the sequence
gets shorter and every later block does less work. In training it selects with Gumbel noise and
a hard top-k whose straight-through gradient trains the scorer, and *masks* instead of
gathering: dropped tokens are zeroed and hidden from every later attention by a key mask, so
the training forward with a given selection computes exactly what the gathered forward computes.
Class, distillation and register tokens are always kept and never counted.

The selectors live in the model (`model.token_selectors`, so they train, save and export with
it) and act through forward hooks on the blocks and on the final norm; every change goes
through a `ModelEdits`, so `remove()` gives the model back as timm built it. `selection_of(model)`
finds a model's selection (cost counters and the report use it).
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.edits import ModelEdits
from sparsekit.surgery.token_positions import (
    SHARED_BIAS,
    BlockPositions,
    block_positions,
    hidden_keys,
    kept_bias,
    kept_rope,
)

POOLS = ("token", "avg", "max")  # pools whose result can ignore dropped tokens exactly
# and attention pooling (`map`, SigLIP's `AttentionPoolLatent`), which takes a key mask


@dataclass(frozen=True)
class Placement:
    """One selector: before block `before_block`, keep `keep_ratio` of the patch tokens that
    reach it."""

    before_block: int
    keep_ratio: float


def kept_count(patches: int, keep_ratio: float) -> int:
    """Patch tokens a selector keeps out of `patches`: ceil(keep_ratio x patches), at least 1.

    Prefix (class, distillation, register) tokens are kept on top and not counted: at 224 px
    keep_ratio 0.95 keeps 187 of 196 patches, 188 tokens. The reference instead keeps the top
    `token_number` of all 197 tokens (187) and then forces the class token in, 186 or 187
    patches depending on whether the class token scored in (SViTE vision_transformer.py:291-300);
    a fixed count is what lets evaluation gather the kept tokens.
    """
    return max(1, min(patches, math.ceil(keep_ratio * patches - 1e-9)))


class TokenScorer(nn.Module):
    """Scores each token with one Linear layer (the reference's scorer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x).squeeze(-1)


class TokenSelection:
    """The selectors of one model and the hooks that apply them.

    Attributes:
        noise: draw Gumbel noise in training (off: the deterministic top-k, as in eval).
        temperature: of the soft scores whose gradient the straight-through estimator uses.
        enabled: select at all (off before the phase's window).
    """

    def __init__(
        self, model: nn.Module, placements: list[Placement], edits: ModelEdits | None = None
    ):
        check_selectable(model, placements)
        if model in _SELECTIONS:
            raise SparsekitError("this model already has token selectors; remove them first.")
        self.model = model
        self.edits = edits or ModelEdits()
        self.placements = sorted(placements, key=lambda p: p.before_block)
        self.prefix = model.num_prefix_tokens
        self.noise = True
        self.temperature = 1.0
        self.enabled = True
        self.gather_in_training = False  # training on the active sub-network gathers too
        self.trace: list[torch.Tensor] | None = None  # a list: eval selections are appended
        scorers = nn.ModuleDict(
            {str(p.before_block): TokenScorer(model.embed_dim) for p in self.placements}
        ).to(next(model.parameters()).device)
        self.edits.add_module(model, "token_selectors", scorers)
        self._alive: torch.Tensor | None = None  # masked mode: which tokens are still in
        # Gathered modes: each kept patch's position in the patch grid, for rotary embeddings.
        self._kept: torch.Tensor | None = None
        _SELECTIONS[model] = self
        self.edits.add_undo(lambda: _SELECTIONS.pop(model, None))
        at = {p.before_block: p for p in self.placements}
        first = self.placements[0].before_block
        for index, block in enumerate(model.blocks):
            if index < first:
                continue
            positions = block_positions(block)
            hook = self._selector(at[index], positions) if index in at else self._later(positions)
            self.edits.hook(block.register_forward_pre_hook(hook, with_kwargs=True))
            if positions.own_bias is not None:
                self._wrap_bias(*positions.own_bias)
        self.edits.hook(model.norm.register_forward_hook(self._fill_dropped))
        if getattr(model, "attn_pool", None) is not None:  # SigLIP's attention pooling
            hook = model.attn_pool.register_forward_pre_hook(self._pool_mask, with_kwargs=True)
            self.edits.hook(hook)

    def remove(self) -> None:
        """Take the selectors, their hooks and the scorer modules out of the model."""
        self.edits.undo()

    def __setstate__(self, state: dict) -> None:
        """A copied model (`copy.deepcopy`) brings a copy of its selection: register it."""
        self.__dict__.update(state)
        _SELECTIONS[self.model] = self

    def scorer_parameters(self) -> list[nn.Parameter]:
        return list(self.model.token_selectors.parameters())

    def tokens_per_block(self, patches: int) -> list[int]:
        """Sequence length each block sees in eval mode (prefix tokens included)."""
        at = {p.before_block: p.keep_ratio for p in self.placements}
        out = []
        for index in range(len(self.model.blocks)):
            if index in at:
                patches = kept_count(patches, at[index])
            out.append(self.prefix + patches)
        return out

    # --- hooks -----------------------------------------------------------------------------
    def _selector(self, placement: Placement, positions: BlockPositions):
        scorer = self.model.token_selectors[str(placement.before_block)]
        first = placement is self.placements[0]

        def hook(block: nn.Module, args: tuple, kwargs: dict):
            if first:
                self._alive = self._kept = None  # a new forward pass begins here
            if not self.enabled:
                return None
            x = args[0]
            if block.training and not self.gather_in_training:
                x = self._select_masked(x, scorer, placement.keep_ratio)
            elif block.training:
                x = self._select_gathered_train(x, scorer, placement.keep_ratio)
            else:
                x = self._select_gathered(x, scorer, placement.keep_ratio)
            return (x, *args[1:]), self._positioned(kwargs, positions, x.dtype)

        return hook

    def _later(self, positions: BlockPositions):
        """A block after the first selector: the key mask (masked mode), or the kept tokens'
        rotary embeddings and shared relative bias (gathered modes)."""

        def hook(block: nn.Module, args: tuple, kwargs: dict):
            if self._alive is None and self._kept is None:
                return None
            return args, self._positioned(kwargs, positions, args[0].dtype)

        return hook

    def _positioned(self, kwargs: dict, positions: BlockPositions, dtype: torch.dtype) -> dict:
        """The block's keyword inputs for the current selection (`token_positions`)."""
        if kwargs.get("attn_mask") is not None:
            raise SparsekitError(
                "the model passed its blocks an attention mask of its own (NaFlexViT does for "
                "batches of patch sequences padded to one length), which the selected tokens "
                "would not line up with; token selection takes image batches. Give the model "
                "images (a tensor of batch x channels x height x width)."
            )
        out = dict(kwargs)
        if self._alive is not None:  # masked: hide the dropped keys
            if positions.mask_arg == "attn_mask":
                out["attn_mask"] = self._key_mask()
            elif positions.own_bias is None:  # else its own bias hides them (`_wrap_bias`)
                given, hidden = kwargs.get(positions.mask_arg), hidden_keys(self._alive, dtype)
                out[positions.mask_arg] = hidden if given is None else given + hidden
        elif self._kept is not None:  # gathered: each kept token keeps its position
            if kwargs.get("rope") is not None:
                out["rope"] = kept_rope(kwargs["rope"], self._kept)
            for arg in SHARED_BIAS:
                if kwargs.get(arg) is not None:
                    out[arg] = kept_bias(kwargs[arg], self._kept_tokens())
        return out

    def _wrap_bias(self, owner: nn.Module, method: str) -> None:
        """Make the block's own relative position bias follow the selection: plus the hidden
        keys while masking, at the kept tokens once gathered."""
        plain = getattr(owner, method)

        def bias() -> torch.Tensor:
            full = plain()
            if self._alive is not None:
                return full + hidden_keys(self._alive, full.dtype)
            if self._kept is not None:
                return kept_bias(full, self._kept_tokens())
            return full

        setattr(owner, method, bias)
        self.edits.add_undo(lambda: delattr(owner, method))

    def _keep(self, index: torch.Tensor) -> None:
        """Record which patches a gathered selection kept, as positions in the patch grid."""
        self._kept = index if self._kept is None else self._kept.gather(1, index)

    def _kept_tokens(self) -> torch.Tensor:
        """The kept tokens' positions in the full sequence: the prefix, then the kept patches."""
        prefix = torch.arange(self.prefix, device=self._kept.device)
        prefix = prefix.expand(self._kept.shape[0], -1)
        return torch.cat([prefix, self._kept + self.prefix], dim=1)

    def _pool_mask(self, module: nn.Module, args: tuple, kwargs: dict):
        """Masked mode: the attention pool's latent query attends to the kept tokens only (an
        additive mask: timm's unfused pool adds its mask to the scores)."""
        if self._alive is None:
            return None
        return args, {**kwargs, "attn_mask": hidden_keys(self._alive, args[0].dtype)}

    def _fill_dropped(self, module: nn.Module, args: tuple, out: torch.Tensor):
        """Give dropped tokens a value the pool cannot see: the mean of the kept tokens (for
        `avg`) or their minimum (for `max`); `token` pools never read them."""
        if self._alive is None or self.model.global_pool in ("token", "map"):
            return None
        alive = self._alive.clone()
        if not getattr(self.model, "pool_include_prefix", False):
            alive[:, : self.prefix] = False
        weights = alive.unsqueeze(-1).to(out.dtype)
        if self.model.global_pool == "avg":
            fill = (out * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        else:
            fill = out.masked_fill(~alive.unsqueeze(-1), float("inf")).amin(1, keepdim=True)
        dropped = ~self._alive.unsqueeze(-1)
        return torch.where(dropped, fill.expand_as(out), out)

    # --- selection -------------------------------------------------------------------------
    def _select_gathered(self, x: torch.Tensor, scorer: TokenScorer, ratio: float) -> torch.Tensor:
        prefix, patches = x[:, : self.prefix], x[:, self.prefix :]
        k = kept_count(patches.shape[1], ratio)
        index = scorer(patches).topk(k, dim=1).indices.sort(dim=1).values
        self._keep(index)
        if self.trace is not None:
            self.trace.append(index)
        kept = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([prefix, kept], dim=1)

    def _noisy(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores plus Gumbel noise (training), one draw per candidate token in order.

        Under torch.distributed every rank draws the noise of the whole global batch from the
        same generator state and keeps its own rows (rank r holds the r-th slice of each global
        batch), so the draws are those a single process would make for the same samples.
        """
        if not self.noise:
            return logits
        rank, world = _rank_and_world()
        batch = logits.shape[0]
        draws = torch.empty(
            (batch * world, *logits.shape[1:]), dtype=logits.dtype, device=logits.device
        )
        gumbel = -draws.exponential_().log()[rank * batch : (rank + 1) * batch]
        return logits + gumbel

    def _select_gathered_train(
        self, x: torch.Tensor, scorer: TokenScorer, ratio: float
    ) -> torch.Tensor:
        """Training on the active sub-network: the same Gumbel top-k and straight-through
        gradient as `_select_masked`, but the kept tokens are gathered."""
        prefix, patches = x[:, : self.prefix], x[:, self.prefix :]
        k = kept_count(patches.shape[1], ratio)
        noisy = self._noisy(scorer(patches).float())
        index = noisy.topk(k, dim=1).indices.sort(dim=1).values
        self._keep(index)
        soft = F.softmax(noisy / self.temperature, dim=1)
        choice = (1.0 + (soft - soft.detach())).gather(1, index)  # exactly 1 going forward
        kept = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([prefix, kept * choice.unsqueeze(-1).to(x.dtype)], dim=1)

    def _select_masked(self, x: torch.Tensor, scorer: TokenScorer, ratio: float) -> torch.Tensor:
        batch, length, _ = x.shape
        if self._alive is None:
            self._alive = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        alive = self._alive[:, self.prefix :]
        count = int(alive[0].sum())  # every sample has as many alive tokens
        k = kept_count(count, ratio)
        logits = scorer(x[:, self.prefix :]).float()
        # Noise is drawn for the alive tokens only, in order, exactly as the gathered selection
        # draws it, so both ways of training see the same choices.
        positions = alive.nonzero()[:, 1].view(batch, count)
        noisy = torch.full_like(logits, float("-inf")).scatter(
            1, positions, self._noisy(logits.gather(1, positions))
        )
        hard = torch.zeros_like(logits).scatter_(1, noisy.topk(k, dim=1).indices, 1.0)
        soft = F.softmax(noisy / self.temperature, dim=1)
        # Straight through: the forward value is exactly the hard 0/1 choice, the gradient is
        # the soft scores'.
        choice = hard + (soft - soft.detach())
        self._alive = torch.cat([self._alive[:, : self.prefix], hard.bool()], dim=1)
        weights = torch.cat([x.new_ones(batch, self.prefix), choice.to(x.dtype)], dim=1)
        return x * weights.unsqueeze(-1)

    def _key_mask(self) -> torch.Tensor:
        """Attention mask (batch, 1, 1, keys): True where a token can be attended to."""
        return self._alive[:, None, None, :]


# Each model's selection, found by `selection_of` (weakly held: a model that is gone drops out).
_SELECTIONS: weakref.WeakKeyDictionary[nn.Module, TokenSelection] = weakref.WeakKeyDictionary()


def selection_of(model: nn.Module) -> TokenSelection | None:
    """The token selection installed in `model`, if any."""
    return _SELECTIONS.get(model)


def check_selectable(model: nn.Module, placements: list[Placement]) -> None:
    """Refuse models on which dropping tokens would be silently wrong.

    Raises:
        SparsekitError: a pool that reads every token, a block that cannot take a key mask,
            a placement outside the model, or two selectors before one block.
    """
    from sparsekit.surgery.targets import check_supported

    check_supported(model)
    depth = len(model.blocks)
    blocks = [p.before_block for p in placements]
    if len(set(blocks)) != len(blocks):
        raise SparsekitError(f"two token selectors before the same block: {sorted(blocks)}.")
    for p in placements:
        if not 0 <= p.before_block < depth:
            raise SparsekitError(
                f"a token selector before block {p.before_block}, but the model has blocks "
                f"0 to {depth - 1}."
            )
    pool = getattr(model, "attn_pool", None)
    if pool is not None and "attn_mask" not in inspect.signature(pool.forward).parameters:
        raise SparsekitError(
            f"{type(model).__name__} pools with {type(pool).__name__}, which takes no key "
            "mask, so it would read the dropped tokens; token selection is not supported on "
            "this model. Build it with global_pool='token' or 'avg' (--model-arg "
            "global_pool=avg)."
        )
    if pool is not None and getattr(pool, "pos_embed", None) is not None:
        raise SparsekitError(
            f"{type(model).__name__}'s attention pool adds a position embedding per token, "
            "which would no longer line up with the kept tokens; token selection is not "
            "supported on this model. Build it with global_pool='token' or 'avg' "
            "(--model-arg global_pool=avg)."
        )
    if pool is None and model.global_pool not in POOLS:
        raise SparsekitError(
            f"{type(model).__name__} pools its tokens with {model.global_pool!r}, which reads "
            f"every token; token selection supports the pools {', '.join(POOLS)}. Build the "
            "model with global_pool='token' or 'avg' (--model-arg global_pool=avg)."
        )
    for index, block in enumerate(model.blocks):
        if block_positions(block).mask_arg is None:
            raise SparsekitError(
                f"block {index} ({type(block).__name__}) takes neither an attention mask nor a "
                "relative position bias, so dropped tokens could not be hidden from it during "
                "training; token selection is not supported on this model."
            )


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
