"""Structured units of a timm ViT: the heads of each attention and the hidden neurons of each MLP.

Everything is read from the modules themselves (`num_heads`, `head_dim`, the fused `qkv`, the
MLP's `fc1`/`fc2`), so no head count is ever passed by hand. A unit is switched off by a 0/1 gate
on the input of the layer that consumes it (`proj` for heads, `fc2` for neurons): a gated-off
head or neuron then contributes exactly nothing, biases included, which is what makes the masked
model and the physically compacted one compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.errors import SparsekitError


@dataclass(frozen=True)
class UnitGroup:
    """The units of one module: the heads of an attention, or the neurons of an MLP.

    `rows` are the Linear layers whose output rows belong to the units (q, k and v rows of each
    head; the fc1 rows of each neuron), `chunks` how many unit-major chunks each of them holds
    (3 for a fused qkv), and `consumer` the Linear whose input columns belong to the units.
    """

    name: str  # e.g. "blocks.3.attn"
    kind: str  # "heads" or "neurons"
    module: nn.Module
    units: int
    width: int  # features per unit: head_dim for heads, 1 for neurons
    rows: tuple[tuple[nn.Linear, int], ...]
    consumer: nn.Linear

    def row_index(self, selected: torch.Tensor, chunks: int) -> torch.Tensor:
        """Output rows of a producer with `chunks` unit-major chunks that belong to the
        selected units (a bool per unit), in order: for a fused qkv, their q rows, then their k
        rows, then their v rows."""
        columns = self.column_index(selected)
        size = self.units * self.width
        return torch.cat([columns + c * size for c in range(chunks)])

    def column_index(self, selected: torch.Tensor) -> torch.Tensor:
        """Input columns of the consumer that belong to the selected units, in order."""
        units = selected.nonzero().flatten().to(self.consumer.weight.device)
        offsets = torch.arange(self.width, device=units.device)
        return (units[:, None] * self.width + offsets).flatten()


def head_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per attention block, with the head layout read from the module.

    Raises:
        SparsekitError: a block's attention is not timm's `Attention`, or it normalizes across
            heads (`scale_norm`), which no head mask can make exact.
    """
    from timm.layers import Attention

    groups = []
    for i, block in enumerate(_blocks(model)):
        attn = getattr(block, "attn", None)
        name = f"blocks.{i}.attn"
        if type(attn) is not Attention:
            raise SparsekitError(
                f"{name} is {type(attn).__name__}, not timm's Attention: head pruning reads the "
                "fused qkv and proj layout of timm's Attention (vit_*, deit*, deit3* models). "
                "Drop the head_prune_grow phase for this model, or use unstructured_dst."
            )
        if not isinstance(attn.norm, nn.Identity):
            raise SparsekitError(
                f"{name} normalizes its output across all heads (scale_norm), so removing a head "
                "would change the others' outputs; head pruning cannot be exact on this model."
            )
        producers: list[tuple[nn.Linear, int]] = [(attn.qkv, 3)]
        if attn.gate is not None:  # gated attention: one gate row per head feature
            producers.append((attn.gate, 1))
        groups.append(
            UnitGroup(
                name, "heads", attn, attn.num_heads, attn.head_dim, tuple(producers), attn.proj
            )
        )
    return groups


def neuron_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per MLP block (timm `Mlp` or `SwiGLU`), one unit per hidden neuron.

    Raises:
        SparsekitError: an MLP of another kind, or one that normalizes across its hidden layer.
    """
    from timm.layers import Mlp, SwiGLU

    groups = []
    for i, block in enumerate(_blocks(model)):
        mlp = getattr(block, "mlp", None)
        name = f"blocks.{i}.mlp"
        if type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear):
            producers: tuple[tuple[nn.Linear, int], ...] = ((mlp.fc1, 1),)
        elif type(mlp) is SwiGLU:
            producers = ((mlp.fc1_g, 1), (mlp.fc1_x, 1))
        else:
            raise SparsekitError(
                f"{name} is {type(mlp).__name__}: neuron pruning supports timm's Mlp and SwiGLU. "
                "Leave mlp_density unset to prune heads only."
            )
        if not isinstance(mlp.norm, nn.Identity):
            raise SparsekitError(
                f"{name} normalizes across its hidden neurons, so removing one would change the "
                "others; neuron pruning cannot be exact on this model. Leave mlp_density unset."
            )
        groups.append(UnitGroup(name, "neurons", mlp, mlp.fc2.in_features, 1, producers, mlp.fc2))
    return groups


def _blocks(model: nn.Module) -> nn.Module:
    from sparsekit.surgery.targets import check_supported

    check_supported(model)
    return model.blocks


class UnitGate:
    """A 0/1 multiplier on the consumer's input, one value per unit.

    Its gradient is what scores the units: at gate 1, |dL/dg| is the first-order Taylor
    importance of the unit's output (|sum of grad x output|); at gate 0 it is the gain of turning
    the unit back on, which is non-zero because a gated-off unit keeps its weights and still
    computes its output. That is what lets growth explore units that were never active.
    """

    def __init__(self, group: UnitGroup, keep: torch.Tensor):
        weight = group.consumer.weight
        self.group = group
        self.values = keep.to(weight.device, weight.dtype, copy=True).requires_grad_(True)
        self._handle = group.consumer.register_forward_pre_hook(self._gate_input)

    def _gate_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple:
        x, *rest = args
        gate = (
            self.values
            if self.group.width == 1
            else self.values.repeat_interleave(self.group.width)
        )
        return (x * gate.to(x.dtype), *rest)

    @torch.no_grad()
    def set(self, keep: torch.Tensor) -> None:
        self.values.copy_(keep)

    def take_grad(self) -> torch.Tensor | None:
        """dL/dg since the last call (None when no backward ran), and clear it."""
        grad, self.values.grad = self.values.grad, None
        return None if grad is None else grad.detach()

    def remove(self) -> None:
        self._handle.remove()
