"""Compute only the active sub-network: attention on the kept heads, MLP on the kept neurons.

Between two prune/grow updates the kept units are fixed, so a training step can run each
attention and MLP with its weights sliced to the kept units (`index_select` of the q/k/v rows,
the proj columns, the fc1 rows and fc2 columns) instead of multiplying full-size outputs by a
0/1 gate. The function computed is the same as the gated model's, gradients included (those of
dropped units are exactly zero in both); the matrix products shrink with the kept share.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.edits import Edit, ModelEdits
from sparsekit.surgery.layouts import is_scaling_block
from sparsekit.surgery.units import UnitGate, UnitGroup

# The classes whose forward `_attention_forward` and `_mlp_forward` reproduce on kept units.
ACTIVE_CLASSES = frozenset(
    {
        "Attention",
        "AttentionRope",
        "NarrowRopeAttention",
        "EvaAttention",
        "NarrowEvaAttention",
        "NarrowBeitAttention",
        "RelPosAttention",
        "NarrowRelPosAttention",
        "Mlp",
        "SwiGLU",
        "GluMlp",
        "DiffAttention",
        "NarrowDiffAttention",
        "ParallelScalingBlock",
        "NarrowParallelScalingBlock",
        "DiffParallelScalingBlock",
        "NarrowDiffParallelScalingBlock",
    }
)


def check_active(groups: list[UnitGroup]) -> None:
    """Refuse `compute: active` for a model with units whose class has no active forward.

    Raises:
        SparsekitError: the first such group, and what to do instead.
    """
    for g in groups:
        name = type(g.module).__name__  # BEiT's `Attention` shares timm's name and is run alike
        if name not in ACTIVE_CLASSES:
            raise SparsekitError(
                f"{g.name} is {name}, whose forward sparsekit does not run on the kept {g.kind} "
                "alone, so training.compute: active cannot train this model; set "
                "training.compute: masked (the gated full-size forward, the same function)."
            )


class ActiveForward:
    """Per group, a forward that runs only the kept units; `enable`/`disable` swap it in and out
    (disabled, the module runs timm's own forward and the gate does the masking)."""

    def __init__(
        self,
        groups: list[UnitGroup],
        gates: dict[str, UnitGate],
        edits: ModelEdits | None = None,
    ):
        self.groups = groups
        self.gates = gates
        self.edits = edits or ModelEdits()
        self._index: dict[str, dict[str, torch.Tensor]] = {}
        self._overrides: list[Edit] = []

    @property
    def enabled(self) -> bool:
        return bool(self._overrides)

    def set(self, keeps: dict[str, torch.Tensor]) -> None:
        """Index tensors for the current masks (recomputed only when the masks change)."""
        for g in self.groups:
            keep = keeps[g.name]
            self._index[g.name] = {
                "units": keep.nonzero().flatten().to(g.consumer.weight.device),
                "cols": g.column_index(keep),
                **{f"rows{i}": g.row_index(keep, rows) for i, rows in enumerate(g.rows)},
                **{f"tensor{i}": g.tensor_index(t, keep) for i, t in enumerate(g.tensors)},
            }

    def enable(self) -> None:
        if self.enabled:
            return
        by_module: dict[int, list[UnitGroup]] = {}
        for g in self.groups:  # a parallel scaling block holds its heads and its neurons
            by_module.setdefault(id(g.module), []).append(g)
        for groups in by_module.values():
            module = groups[0].module
            if is_scaling_block(module):
                make = _scaling_forward(groups, self._index, self.gates)
            elif groups[0].kind == "heads":
                make = _attention_forward(groups[0], self._index, self.gates[groups[0].name])
            else:
                make = _mlp_forward(groups[0], self._index, self.gates[groups[0].name])
            forward = types.MethodType(make, module)
            self._overrides.append(self.edits.override_forward(module, forward))

    def disable(self) -> None:
        """Back to the modules' class forward (and the gates' masking)."""
        overrides, self._overrides = self._overrides, []
        for edit in overrides:
            edit.remove()


def _rows(linear: nn.Linear, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = linear.bias.index_select(0, index) if linear.bias is not None else None
    return linear.weight.index_select(0, index), bias


def _attention_forward(group: UnitGroup, indices: dict, gate: UnitGate):
    """The forward of every attention class `layouts` knows (timm's `Attention` and
    `AttentionRope`, `EvaAttention`, BEiT's `Attention`, `RelPosAttention`, `DiffAttention`)
    on the kept heads only, in timm's order of operations: q/k/v from a fused or separate
    projections (EVA's and BEiT's separate biases sliced alike), q/k norms, rotary embeddings
    past the prefix tokens, each kept head's slice of a relative position bias, the gate."""
    from sparsekit.surgery.narrow_attention import attend, differential_heads

    # The class forward's arguments after (self, x), by position: rope, attn_mask, is_causal,
    # shared_rel_pos_bias, ... as each class orders them.
    names = list(inspect.signature(type(group.module).forward).parameters)[2:]
    producer = {id(r.linear): i for i, r in enumerate(group.rows)}
    # Each `UnitTensor`'s index key, by (owner, attribute): EVA's and BEiT's q/k/v biases, and
    # with grouped-query attention the k and v rows of their Linear (a head wide).
    tensor = {(id(t.owner), t.attr): f"tensor{i}" for i, t in enumerate(group.tensors)}
    groups = getattr(group.module, "num_kv_groups", 1)

    def forward(attn: nn.Module, x: torch.Tensor, *args, **kwargs):
        if not attn.training:  # evaluation runs the gated full-size model
            return type(attn).forward(attn, x, *args, **kwargs)
        options = {**dict(zip(names, args, strict=False)), **kwargs}
        index = indices[group.name]
        units, heads, width = index["units"], index["units"].numel(), group.width
        batch, length, _ = x.shape

        def project(linear: nn.Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
            if id(linear) in producer:
                weight, own_bias = _rows(linear, index[f"rows{producer[id(linear)]}"])
            else:  # a key or value projection of grouped-query attention
                weight, own_bias = (
                    None if t is None else t.index_select(0, index[tensor[id(linear), a]])
                    for a, t in (("weight", linear.weight), ("bias", linear.bias))
                )
            return F.linear(x, weight, own_bias if bias is None else bias)

        if hasattr(attn, "lambda_init"):  # DiffAttention: two maps per head, subtracted
            mask, causal = options.get("attn_mask"), options.get("is_causal", False)
            x = differential_heads(attn, project(attn.qkv), mask, causal)
            x = F.linear(gate.apply(x, units), attn.proj.weight.index_select(1, index["cols"]))
            return attn.proj_drop(x if attn.proj.bias is None else x + attn.proj.bias)
        gated = project(attn.gate).sigmoid() if getattr(attn, "gate", None) is not None else None
        if getattr(attn, "qkv", None) is not None:
            bias = None
            if getattr(attn, "q_bias", None) is not None:  # EVA, BEiT: q, k, v biases apart
                parts = ("q_bias", "k_bias", "v_bias")
                bias = torch.cat(
                    [getattr(attn, a).index_select(0, index[tensor[id(attn), a]]) for a in parts]
                )
            qkv = project(attn.qkv, bias).reshape(batch, length, 3, heads, width)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                project(p).reshape(batch, length, count, attn.head_dim).transpose(1, 2)
                for p, count in (
                    (attn.q_proj, heads * groups),
                    (attn.k_proj, heads),
                    (attn.v_proj, heads),
                )
            )
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        rope = options.get("rope")
        if rope is not None and rope.ndim >= 3 and rope.shape[-3] > 1:  # per head: the kept
            rope = rope.index_select(rope.ndim - 3, units)
        if rope is not None:
            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q, k = (
                torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], 2)
                for t in (q, k)
            )
            q, k = q.type_as(v), k.type_as(v)
        if groups > 1:  # each key/value head serves its group of query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        bias = _head_bias(attn, options, units)
        x = attend(attn, q, k, v, bias, options.get("is_causal", False))
        if gated is not None:
            x = x * gated
        # The kept heads' gate values (all 1): their gradient is the Taylor prune score.
        x = gate.apply(x, units)
        x = F.linear(x, attn.proj.weight.index_select(1, index["cols"]), attn.proj.bias)
        return attn.proj_drop(x)

    return forward


def _head_bias(attn: nn.Module, options: dict, units: torch.Tensor) -> torch.Tensor | None:
    """The attention's score bias (`narrow_attention.score_bias`) for the kept heads: a
    per-head bias (batch or 1, heads, queries, keys) sliced to them; a mask the same for every
    head as it is (a per-head
    bias shared by all blocks never reaches here: `layouts` refuses head pruning with one)."""
    from sparsekit.surgery.narrow_attention import score_bias

    bias = score_bias(attn, options)
    per_head = bias is not None and bias.ndim == 4 and bias.shape[1] > 1
    return bias.index_select(1, units) if per_head else bias


def _mlp_forward(group: UnitGroup, indices: dict, gate: UnitGate):
    """timm `Mlp` / `SwiGLU` / `GluMlp` forward on the kept neurons only."""

    def forward(mlp: nn.Module, x: torch.Tensor):
        if not mlp.training:
            return type(mlp).forward(mlp, x)
        index = indices[group.name]
        if hasattr(mlp, "fc1_g"):  # SwiGLU
            hidden = mlp.act(F.linear(x, *_rows(mlp.fc1_g, index["rows0"])))
            hidden = hidden * F.linear(x, *_rows(mlp.fc1_x, index["rows1"]))
        elif hasattr(mlp, "chunk_dim"):  # GluMlp: the kept value rows, then their gate rows
            value, gates = F.linear(x, *_rows(mlp.fc1, index["rows0"])).chunk(2, dim=-1)
            hidden = value * mlp.act(gates) if mlp.gate_last else mlp.act(value) * gates
        else:
            hidden = mlp.act(F.linear(x, *_rows(mlp.fc1, index["rows0"])))
        hidden = mlp.norm(mlp.drop1(hidden))
        hidden = gate.apply(hidden, index["units"])
        out = F.linear(hidden, mlp.fc2.weight.index_select(1, index["cols"]), mlp.fc2.bias)
        return mlp.drop2(out)

    return forward


def _scaling_forward(groups: list[UnitGroup], indices: dict, gates: dict[str, UnitGate]):
    """A `ParallelScalingBlock`'s or `DiffParallelScalingBlock`'s forward on the kept heads
    and neurons only (`narrow_attention.scaling_block` on their rows and columns); a kind
    that no phase gates runs whole."""
    from sparsekit.surgery.narrow_attention import scaling_block

    heads = next((g for g in groups if g.kind == "heads"), None)
    neurons = next((g for g in groups if g.kind == "neurons"), None)

    def forward(block: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if not block.training:
            return type(block).forward(block, x, attn_mask, is_causal)
        hidden, width = block.in_split[0], block.in_split[1]
        fused = block.out_proj is not None

        def kept(group: UnitGroup | None, key: str, start: int, size: int) -> torch.Tensor:
            """The kept units' positions, or all `size` from `start` of a kind not gated."""
            if group is None:
                return torch.arange(start, start + size, device=block.in_proj.weight.device)
            return indices[group.name][key]

        mlp_rows = kept(neurons, "rows0", 0, hidden)
        rows = torch.cat((mlp_rows, kept(heads, "rows0", hidden, 3 * width)))
        attn_cols = kept(heads, "cols", 0, width)
        mlp_cols = kept(neurons, "cols", width if fused else 0, hidden)
        mlp_bias = block.mlp_bias
        if neurons is not None and mlp_bias is not None:
            mlp_bias = mlp_bias.index_select(0, indices[neurons.name]["tensor0"])

        def in_proj(y: torch.Tensor):
            return F.linear(y, *_rows(block.in_proj, rows)), mlp_rows.numel(), mlp_bias

        def out_proj(x_attn: torch.Tensor, x_mlp: torch.Tensor) -> torch.Tensor:
            # The kept units' gate values (all 1): their gradient is the Taylor prune score.
            if heads is not None:
                x_attn = gates[heads.name].apply(x_attn, indices[heads.name]["units"])
            if neurons is not None:
                x_mlp = gates[neurons.name].apply(x_mlp, indices[neurons.name]["units"])
            if fused:
                weight = block.out_proj.weight.index_select(1, torch.cat((attn_cols, mlp_cols)))
                return F.linear(torch.cat((x_attn, x_mlp), dim=-1), weight, block.out_proj.bias)
            attn, mlp = block.attn_out_proj, block.mlp_out_proj
            return F.linear(x_attn, attn.weight.index_select(1, attn_cols), attn.bias) + F.linear(
                x_mlp, mlp.weight.index_select(1, mlp_cols), mlp.bias
            )

        return scaling_block(block, x, attn_mask, is_causal, in_proj, out_proj)

    return forward
