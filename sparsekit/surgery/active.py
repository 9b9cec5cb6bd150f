"""Compute only the active sub-network: attention on the kept heads, MLP on the kept neurons.

Between two prune/grow updates the kept units are fixed, so a training step can run each
attention and MLP with its weights sliced to the kept units (`index_select` of the q/k/v rows,
the proj columns, the fc1 rows and fc2 columns) instead of multiplying full-size outputs by a
0/1 gate. The function computed is the same as the gated model's, gradients included (those of
dropped units are exactly zero in both); the matrix products shrink with the kept share.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.surgery.edits import Edit, ModelEdits
from sparsekit.surgery.units import UnitGate, UnitGroup


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
                **{f"rows{i}": g.row_index(keep, chunks) for i, (_, chunks) in enumerate(g.rows)},
            }

    def enable(self) -> None:
        if self.enabled:
            return
        for g in self.groups:
            make = _attention_forward if g.kind == "heads" else _mlp_forward
            forward = types.MethodType(make(g, self._index, self.gates[g.name]), g.module)
            self._overrides.append(self.edits.override_forward(g.module, forward))

    def disable(self) -> None:
        """Back to the modules' class forward (and the gates' masking)."""
        overrides, self._overrides = self._overrides, []
        for edit in overrides:
            edit.remove()


def _rows(linear: nn.Linear, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = linear.bias.index_select(0, index) if linear.bias is not None else None
    return linear.weight.index_select(0, index), bias


def _attention_forward(group: UnitGroup, indices: dict, gate: UnitGate):
    """timm `Attention.forward` on the kept heads only (same order of operations)."""

    def forward(attn: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if not attn.training:  # evaluation runs the gated full-size model
            return type(attn).forward(attn, x, attn_mask=attn_mask, is_causal=is_causal)
        index = indices[group.name]
        heads, width = index["units"].numel(), attn.head_dim
        batch, length, _ = x.shape
        gated = None
        if attn.gate is not None:
            gated = F.linear(x, *_rows(attn.gate, index["rows1"])).sigmoid()
        qkv = F.linear(x, *_rows(attn.qkv, index["rows0"]))
        q, k, v = qkv.reshape(batch, length, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=attn.attn_drop.p if attn.training else 0.0,
                is_causal=is_causal,
            )
        else:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            scores = (q * attn.scale) @ k.transpose(-2, -1)
            scores = maybe_add_mask(
                scores, resolve_self_attn_mask(length, scores, attn_mask, is_causal)
            )
            x = attn.attn_drop(scores.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(batch, length, heads * width)
        if gated is not None:
            x = x * gated
        # The kept heads' gate values (all 1): their gradient is the Taylor prune score.
        x = gate.apply(x, index["units"])
        x = F.linear(x, attn.proj.weight.index_select(1, index["cols"]), attn.proj.bias)
        return attn.proj_drop(x)

    return forward


def _mlp_forward(group: UnitGroup, indices: dict, gate: UnitGate):
    """timm `Mlp` / `SwiGLU` forward on the kept neurons only."""

    def forward(mlp: nn.Module, x: torch.Tensor):
        if not mlp.training:
            return type(mlp).forward(mlp, x)
        index = indices[group.name]
        if hasattr(mlp, "fc1_g"):  # SwiGLU
            hidden = mlp.act(F.linear(x, *_rows(mlp.fc1_g, index["rows0"])))
            hidden = hidden * F.linear(x, *_rows(mlp.fc1_x, index["rows1"]))
        else:
            hidden = mlp.act(F.linear(x, *_rows(mlp.fc1, index["rows0"])))
        hidden = mlp.norm(mlp.drop1(hidden))
        hidden = gate.apply(hidden, index["units"])
        out = F.linear(hidden, mlp.fc2.weight.index_select(1, index["cols"]), mlp.fc2.bias)
        return mlp.drop2(out)

    return forward
