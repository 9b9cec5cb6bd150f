"""Dense warm-up: the network trains dense inside this window.

It owns no weights; the recipe checks and the compiler guarantee that no sparse phase acts
inside it, and the trainer shows it as the current phase.
"""

from __future__ import annotations

from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import register
from sparsekit.recipe.phases import DenseWarmupPhase


@register(DenseWarmupPhase)
class DenseWarmup(Modifier):
    """Marks a dense window on the timeline."""
