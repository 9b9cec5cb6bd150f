"""Where the heads and neurons live in each timm attention and MLP class: the adapter seam.

Every structured operation (gates, prune-grow, compaction, expansion, optimizer-state resets)
works on `UnitGroup`s; this module is the one place that knows, class by class, which rows,
columns and tensors belong to a head or a neuron, what must hold for removing one to be exact,
and what a module must be told once it keeps fewer. A class not listed here is refused with the
reason, never guessed at.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.targets import check_supported, parallel_kind
from sparsekit.surgery.units import Rows, UnitGroup, UnitTensor


def head_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per attention, with the head layout read from the module
    (`layouts.head_group`): one per block, two per `ParallelThingsBlock` (one per branch).

    Raises:
        SparsekitError: an attention whose heads sparsekit cannot remove exactly, and why.
    """
    return [head_group(model, n, part) for n, part in _parts(model, "attn")]


def neuron_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per MLP, one unit per hidden neuron (`layouts.neuron_group`).

    Raises:
        SparsekitError: an MLP whose neurons sparsekit cannot remove exactly, and why.
    """
    return [neuron_group(n, part) for n, part in _parts(model, "mlp")]


def group_names(i: int, block: nn.Module) -> list[tuple[str, str]]:
    """(head group, neuron group) names of each attention and MLP pair of block `i`: the
    block's own ("blocks.3.attn", "blocks.3.mlp"), or one pair per branch of a
    `ParallelThingsBlock` ("blocks.3.attns.0.attn", "blocks.3.ffns.0.mlp"). A
    `ParallelScalingBlock` holds its units itself and keeps the block's names."""
    if hasattr(block, "attns"):
        branches = range(len(block.attns))
        return [(f"blocks.{i}.attns.{j}.attn", f"blocks.{i}.ffns.{j}.mlp") for j in branches]
    return [(f"blocks.{i}.attn", f"blocks.{i}.mlp")]


def _parts(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """(group name, the module holding its `attn` or `mlp`) for every attention (`kind`
    "attn") or MLP ("mlp") of the model, named by `group_names`."""
    side = 0 if kind == "attn" else 1
    parts = []
    for i, block in enumerate(_blocks(model)):
        branches = hasattr(block, "attns")
        holders = list(zip(block.attns, block.ffns, strict=True)) if branches else [(block,) * 2]
        for names, modules in zip(group_names(i, block), holders, strict=True):
            parts.append((names[side], modules[side]))
    return parts


def gateable_groups(model: nn.Module) -> list[UnitGroup]:
    """The model's head groups and then its neuron groups; a kind whose layout sparsekit
    cannot gate in this model is left out (its units stay whole)."""
    groups: list[UnitGroup] = []
    for find in (head_groups, neuron_groups):
        try:
            groups += find(model)
        except SparsekitError:
            continue
    return groups


def _blocks(model: nn.Module) -> nn.Module:
    check_supported(model)
    return model.blocks


def head_group(model: nn.Module, name: str, block: nn.Module) -> UnitGroup:
    """The heads of `block.attn`.

    Raises:
        SparsekitError: the attention class is unknown, or its heads cannot be removed exactly
            (normalized together, shared keys and values, per-head tables shared by blocks).
    """
    if is_scaling_block(block):
        return _scaling_heads(name, block)
    attn = getattr(block, "attn", None)
    layout = _HEAD_LAYOUTS.get(_qualname(attn))
    if layout is None:
        known = ", ".join(sorted({n.rsplit(".", 1)[1] for n in _HEAD_LAYOUTS if "Narrow" not in n}))
        raise SparsekitError(
            f"{name} is {type(attn).__name__} ({type(attn).__module__}), an attention class "
            f"whose head layout sparsekit does not know (it knows {known}). Drop the "
            "head_prune_grow phase for this model, or use unstructured_dst."
        )
    if hasattr(attn, "norm") and not isinstance(attn.norm, nn.Identity):
        raise SparsekitError(
            f"{name} normalizes its output across all heads (scale_norm), so removing a head "
            "would change the others' outputs; head pruning cannot be exact on this model. "
            "Drop the head_prune_grow phase, or use unstructured_dst."
        )
    return layout(model, name, attn)


def neuron_group(name: str, block: nn.Module) -> UnitGroup:
    """The hidden neurons of `block.mlp`.

    Raises:
        SparsekitError: an MLP of another kind, or one that normalizes across its hidden layer.
    """
    if is_scaling_block(block):
        return _scaling_neurons(name, block)
    mlp = getattr(block, "mlp", None)
    kind = _qualname(mlp)
    if kind == "timm.layers.mlp.Mlp" and isinstance(mlp.fc1, nn.Linear):
        producers: tuple[tuple[nn.Linear, int], ...] = ((mlp.fc1, 1),)
    elif kind == "timm.layers.mlp.SwiGLU":
        producers = ((mlp.fc1_g, 1), (mlp.fc1_x, 1))
    elif kind == "timm.layers.mlp.GluMlp" and mlp.chunk_dim == -1:
        producers = ((mlp.fc1, 2),)  # value and gate halves: neuron i owns rows i and i + H
    else:
        raise SparsekitError(
            f"{name} is {type(mlp).__name__}: neuron pruning supports timm's Mlp, SwiGLU and "
            "GluMlp. Leave mlp_density and mlp_neurons unset to prune heads only."
        )
    if not isinstance(mlp.norm, nn.Identity):
        raise SparsekitError(
            f"{name} normalizes across its hidden neurons (scale_mlp), so removing one would "
            "change the others; neuron pruning cannot be exact on this model. Leave "
            "mlp_density and mlp_neurons unset."
        )
    return UnitGroup(name, "neurons", mlp, mlp.fc2.in_features, 1, producers, mlp.fc2)


def is_scaling_block(block: nn.Module) -> bool:
    """Whether `block` is a parallel scaling block (`ParallelScalingBlock` or
    `DiffParallelScalingBlock`, compacted or not), which holds its heads and neurons itself."""
    return parallel_kind(block) in ("ParallelScalingBlock", "DiffParallelScalingBlock")


def _scaling_heads(name: str, block: nn.Module) -> UnitGroup:
    """The heads of a `ParallelScalingBlock` or `DiffParallelScalingBlock`: their q, k and v
    rows follow the MLP's hidden rows in the block's `in_proj` ([hidden | q | k | v]), their
    columns come first in a fused `out_proj` ([heads | hidden]) or fill `attn_out_proj`. A
    differential head is twice the block's `head_dim` wide (two q and two k sub-heads)."""
    hidden, width = block.in_split[0], block.in_split[1] // block.num_heads
    consumer = block.out_proj if block.out_proj is not None else block.attn_out_proj

    def resize(kept: int) -> None:
        block.num_heads = kept
        block.in_split = [block.in_split[0]] + [kept * width] * 3

    rows = (Rows(block.in_proj, 3, hidden),)
    return UnitGroup(
        name,
        "heads",
        block,
        block.num_heads,
        width,
        rows,
        consumer,
        resize=_narrowed(block, resize),
    )


def _scaling_neurons(name: str, block: nn.Module) -> UnitGroup:
    """The MLP neurons of a `ParallelScalingBlock` or `DiffParallelScalingBlock`: the first
    rows of its `in_proj` (with `mlp_bias` when the projection has no bias), and the columns
    of `mlp_out_proj` or those after the heads' in a fused `out_proj`."""
    hidden, heads_width = block.in_split[0], block.in_split[1]
    fused = block.out_proj is not None
    consumer = block.out_proj if fused else block.mlp_out_proj
    tensors = (UnitTensor(block, "mlp_bias", 0, 1),) if block.mlp_bias is not None else ()

    def resize(kept: int) -> None:
        block.in_split = [kept] + block.in_split[1:]

    return UnitGroup(
        name,
        "neurons",
        block,
        hidden,
        1,
        (Rows(block.in_proj, 1, 0),),
        consumer,
        tensors=tensors,
        consumer_start=heads_width if fused else 0,
        resize=_narrowed(block, resize),
    )


def _qualname(module: object) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _gate(attn: nn.Module) -> tuple[tuple[nn.Linear, int], ...]:
    """A gated attention's gate: one row per head feature."""
    return ((attn.gate, 1),) if getattr(attn, "gate", None) is not None else ()


def _qkv(attn: nn.Module) -> tuple[tuple[nn.Linear, int], ...]:
    if getattr(attn, "qkv", None) is not None:
        return ((attn.qkv, 3),)
    return ((attn.q_proj, 1), (attn.k_proj, 1), (attn.v_proj, 1))


def _separate_biases(attn: nn.Module, width: int) -> tuple[UnitTensor, ...]:
    """EVA's and BEiT's q, k and v biases kept beside a bias-free fused qkv."""
    if getattr(attn, "q_bias", None) is None:
        return ()
    return tuple(UnitTensor(attn, a, 0, width) for a in ("q_bias", "k_bias", "v_bias"))


def _set(module: nn.Module, **values) -> Callable[[int], None]:
    """A `resize` that sets each attribute to (units kept) x its factor."""

    def resize(kept: int) -> None:
        for attr, factor in values.items():
            setattr(module, attr, kept * factor)

    return resize


def _chain(*steps: Callable[[int], None]) -> Callable[[int], None]:
    """A `resize` that runs each of `steps`."""

    def resize(kept: int) -> None:
        for step in steps:
            step(kept)

    return resize


def _per_head_rope(model: nn.Module) -> bool:
    """Whether the model learns rotary frequencies per head (EVA's `rope_mixed`, NaFlexViT's
    `rope_is_mixed`)."""
    return bool(getattr(model, "rope_mixed", False) or getattr(model, "rope_is_mixed", False))


def _narrowed(module: nn.Module, then: Callable[[int], None]) -> Callable[[int], None]:
    """A `resize` that also gives the module the forward of its narrow class: timm's forward
    of these classes reshapes the heads' output to the block's width, which holds only while
    every head is kept."""
    from sparsekit.surgery.narrow_attention import narrow_class

    def resize(kept: int) -> None:
        then(kept)
        module.__class__ = narrow_class(type(module))

    return resize


def _heads(name: str, attn: nn.Module, width: int, producers, **fields) -> UnitGroup:
    """The heads of `attn`, consumed by its `proj`."""
    return UnitGroup(name, "heads", attn, attn.num_heads, width, producers, attn.proj, **fields)


def _vit_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """timm `Attention` (ViT, DeiT, NaFlexViT, hybrid ViTs): fused qkv, optional gate."""
    resize = _set(attn, num_heads=1, attn_dim=attn.head_dim)
    return _heads(name, attn, attn.head_dim, _qkv(attn) + _gate(attn), resize=resize)


def _rope_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """timm `AttentionRope` (timm's RoPE ViTs built by eva.py): fused or separate q/k/v."""
    if attn.num_kv_heads != attn.num_heads:
        return _grouped_query_attention(model, name, attn)
    resize = _set(attn, num_heads=1, num_kv_heads=1, attn_dim=attn.head_dim, kv_dim=attn.head_dim)
    arrange = _mixed_rope(model, name)
    if arrange is not None:  # its block's rotary frequencies stay full: take the first heads'
        resize = _narrowed(attn, resize)
    fields = {"resize": resize, "arrange": arrange}
    return _heads(name, attn, attn.head_dim, _qkv(attn) + _gate(attn), **fields)


def _grouped_query_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """`AttentionRope` with fewer key/value heads than query heads (Sapiens2): the unit is a
    key/value head with the query heads that share it (contiguous: query head h reads key/value
    head h // groups), so its q rows, gate rows and proj columns are `groups` heads wide and its
    k and v rows one head wide."""
    if _per_head_rope(model):
        raise SparsekitError(
            f"{name} pairs grouped-query attention with per-head rotary frequencies, which "
            "no timm model builds; head pruning does not support it. Use unstructured_dst."
        )
    groups, width = attn.num_kv_groups, attn.head_dim
    kv = tuple(
        UnitTensor(linear, attr, 0, width)
        for linear in (attn.k_proj, attn.v_proj)
        for attr in ("weight", "bias")
        if getattr(linear, attr) is not None
    )
    resize = _chain(
        _set(attn, num_heads=groups, num_kv_heads=1, attn_dim=groups * width, kv_dim=width),
        _set(attn.k_proj, out_features=width),
        _set(attn.v_proj, out_features=width),
    )
    producers = ((attn.q_proj, 1),) + _gate(attn)
    return UnitGroup(
        name,
        "heads",
        attn,
        attn.num_kv_heads,
        groups * width,
        producers,
        attn.proj,
        tensors=kv,
        resize=resize,
    )


def _eva_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """EVA's `EvaAttention`: fused qkv with separate q/v biases, or separate q/k/v."""
    if _per_head_rope(model):
        raise SparsekitError(
            f"{name} is EVA's attention under per-head rotary frequencies (rope_mixed), a "
            "pairing no timm model builds; head pruning does not support it. Use "
            "unstructured_dst."
        )
    return _heads(
        name,
        attn,
        attn.head_dim,
        _qkv(attn) + _gate(attn),
        tensors=_separate_biases(attn, attn.head_dim),
        resize=_narrowed(attn, _set(attn, num_heads=1)),
    )


def _beit_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """BEiT's `Attention`: fused qkv, separate q/v biases, a relative position bias table
    with one column per head."""
    if getattr(model, "rel_pos_bias", None) is not None:
        raise SparsekitError(
            f"{name} adds a relative position bias shared by every block "
            "(use_shared_rel_pos_bias), so its per-head columns cannot follow each block's "
            "heads; head pruning cannot be exact on this model. Use unstructured_dst."
        )
    width = attn.qkv.out_features // 3 // attn.num_heads  # BEiT keeps no head_dim attribute
    tensors = _separate_biases(attn, width)
    if attn.relative_position_bias_table is not None:
        tensors += (UnitTensor(attn, "relative_position_bias_table", 1, 1),)

    def resize(kept: int) -> None:
        attn.num_heads, attn.head_dim = kept, width

    return _heads(name, attn, width, _qkv(attn), tensors=tensors, resize=_narrowed(attn, resize))


def _relpos_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """`RelPosAttention` (vit_relpos_*, vit_srelpos_*): fused qkv and a relative position
    bias per head, from a table (`RelPosBias`) or a small MLP (`RelPosMlp`)."""
    if getattr(model, "shared_rel_pos", None) is not None:
        raise SparsekitError(
            f"{name} adds a relative position bias shared by every block (vit_srelpos_*), so its "
            "per-head part cannot follow each block's heads; head pruning cannot be exact on "
            "this model. Use unstructured_dst."
        )
    rel = attn.rel_pos
    tensors: tuple[UnitTensor, ...] = ()
    resizes = [_set(attn, num_heads=1)]
    if rel is not None and hasattr(rel, "relative_position_bias_table"):
        tensors = (UnitTensor(rel, "relative_position_bias_table", 1, 1),)
        resizes.append(_bias_shape(rel))
    elif rel is not None:  # RelPosMlp: its last layer has one output per head
        fc2 = rel.mlp.fc2
        tensors = (UnitTensor(fc2, "weight", 0, 1),)
        if fc2.bias is not None:
            tensors += (UnitTensor(fc2, "bias", 0, 1),)
        resizes += [_set(rel, num_heads=1), _set(fc2, out_features=1), _bias_shape(rel)]
    resize = _narrowed(attn, _chain(*resizes))
    return _heads(name, attn, attn.head_dim, _qkv(attn), tensors=tensors, resize=resize)


def _diff_attention(model: nn.Module, name: str, attn: nn.Module) -> UnitGroup:
    """timm `DiffAttention`: each head owns two q and two k sub-heads and a v of twice the
    head width, contiguous in the fused qkv's chunks, and normalizes only its own output."""
    width = 2 * attn.head_dim
    return _heads(name, attn, width, _qkv(attn), resize=_narrowed(attn, _set(attn, num_heads=1)))


def _bias_shape(rel: nn.Module) -> Callable[[int], None]:
    def resize(kept: int) -> None:
        rel.bias_shape = (*rel.bias_shape[:-1], kept)

    return resize


def _mixed_rope(model: nn.Module, name: str) -> Callable[[torch.Tensor], None] | None:
    """For a `rope_mixed` model, the `arrange` of block `name`'s heads: its slice of the
    model's learned frequencies (2, blocks, heads, head_dim / 2), kept heads first. The slice
    stays full-size (one tensor serves every block) and the narrow attention takes its first
    heads' embeddings. None for a model without per-head frequencies.

    Raises:
        SparsekitError: per-head frequencies held some other way (NaFlexViT's).
    """
    if getattr(model, "rope_is_mixed", False):
        raise SparsekitError(
            f"{name} takes NaFlexViT's per-head rotary frequencies (rope_type='mixed'), which "
            "sparsekit cannot line up with each block's kept heads; head pruning does not "
            "support them yet. Use unstructured_dst."
        )
    if not getattr(model, "rope_mixed", False):
        return None
    block = int(name.split(".")[1])

    @torch.no_grad()
    def arrange(keep: torch.Tensor) -> None:
        freqs = model.rope.freqs
        keep = keep.to(torch.bool).cpu()
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])
        freqs[:, block] = freqs[:, block].index_select(1, order.to(freqs.device))

    return arrange


_HEAD_LAYOUTS: dict[str, Callable[[nn.Module, str, nn.Module], UnitGroup]] = {
    "timm.layers.attention.Attention": _vit_attention,
    "timm.layers.attention.AttentionRope": _rope_attention,
    "timm.models.eva.EvaAttention": _eva_attention,
    "timm.models.beit.Attention": _beit_attention,
    "timm.models.vision_transformer_relpos.RelPosAttention": _relpos_attention,
    "timm.layers.diff_attention.DiffAttention": _diff_attention,
    # The same classes once compacted (`narrow_attention`).
    "sparsekit.surgery.narrow_attention.NarrowRopeAttention": _rope_attention,
    "sparsekit.surgery.narrow_attention.NarrowEvaAttention": _eva_attention,
    "sparsekit.surgery.narrow_attention.NarrowBeitAttention": _beit_attention,
    "sparsekit.surgery.narrow_attention.NarrowRelPosAttention": _relpos_attention,
    "sparsekit.surgery.narrow_attention.NarrowDiffAttention": _diff_attention,
}


def block_shape(block: nn.Module) -> tuple[int, int, int]:
    """(heads, head width, MLP hidden neurons) of any supported block, whether or not its
    units can be pruned. A parallel block counts the heads and neurons of all its branches."""
    if hasattr(block, "attns"):  # ParallelThingsBlock: parallel Attention and Mlp branches
        shapes = [attention_shape(branch.attn) for branch in block.attns]
        hidden = sum(mlp_width(branch.mlp) for branch in block.ffns)
        return sum(h for h, _ in shapes), shapes[0][1], hidden
    if is_scaling_block(block):  # [mlp hidden, q, k, v] in in_proj
        hidden, width = block.in_split[0], block.in_split[1]
        return block.num_heads, width // block.num_heads, hidden
    heads, width = attention_shape(block.attn)
    return heads, width, mlp_width(block.mlp)


def branch_shapes(block: nn.Module) -> list[tuple[int, int]] | None:
    """(heads, MLP hidden neurons) of each branch of a `ParallelThingsBlock` (branch j:
    `attns.j` and `ffns.j`); None for any other block."""
    if not hasattr(block, "attns"):
        return None
    return [
        (attention_shape(a.attn)[0], mlp_width(f.mlp))
        for a, f in zip(block.attns, block.ffns, strict=True)
    ]


def attention_shape(attn: nn.Module) -> tuple[int, int]:
    """(heads, head width) of the attention of any supported block, whether or not its heads
    can be pruned: the width is each head's share of the proj input (BEiT keeps no `head_dim`;
    a `DiffAttention` head is two sub-heads wide)."""
    heads = attn.num_heads
    return heads, attn.proj.in_features // heads


def mlp_width(mlp: nn.Module) -> int:
    """Hidden neurons of the MLP of any supported block (the input width of its fc2)."""
    return mlp.fc2.in_features
