"""Every phase kind's recipe side. A new kind is one more file here and one more line below."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from sparsekit.recipe.phases.base import PhaseConfig, WindowedPhase
from sparsekit.recipe.phases.dense_warmup import DenseWarmupPhase
from sparsekit.recipe.phases.fixed_sparsity import FixedSparsityPhase
from sparsekit.recipe.phases.head_prune_grow import HeadPruneGrowPhase
from sparsekit.recipe.phases.magnitude_prune import MagnitudePrunePhase
from sparsekit.recipe.phases.token_select import TokenPlacement, TokenSelectPhase
from sparsekit.recipe.phases.unstructured_dst import UnstructuredDSTPhase

PHASES: tuple[type[PhaseConfig], ...] = (
    DenseWarmupPhase,
    UnstructuredDSTPhase,
    MagnitudePrunePhase,
    HeadPruneGrowPhase,
    TokenSelectPhase,
    FixedSparsityPhase,
)
Phase = Annotated[Union[PHASES], Field(discriminator="kind")]  # noqa: UP007 (built from a tuple)
PHASE_KINDS: tuple[str, ...] = tuple(p.kind_name() for p in PHASES)

__all__ = [
    "PHASES",
    "PHASE_KINDS",
    "DenseWarmupPhase",
    "FixedSparsityPhase",
    "HeadPruneGrowPhase",
    "MagnitudePrunePhase",
    "Phase",
    "PhaseConfig",
    "TokenPlacement",
    "TokenSelectPhase",
    "UnstructuredDSTPhase",
    "WindowedPhase",
]
