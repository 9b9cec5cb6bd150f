"""What every phase kind is on the recipe side: pure data that describes itself.

A phase kind is a config class (a subclass of `PhaseConfig`, in its own file in this package,
listed once in `__init__.py`) and a run-time modifier (in `sparsekit/modifiers/`, registered
for the config class). The class variables below are the kind's traits: the recipe checks,
the compiler, `recipe show` and the trainer read them instead of comparing kind names, so
nothing outside a kind's own files knows which kinds exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from sparsekit.recipe.span import Span
from sparsekit.recipe.strict import Strict

if TYPE_CHECKING:
    from sparsekit.timeline import Timeline


class PhaseConfig(Strict):
    """What every phase has: a label and a start."""

    name: str | None = Field(None, description="Optional label shown in progress and tables.")
    start: Span = Field(Span(0, "epochs"), description="When the phase begins.")

    # --- traits ---------------------------------------------------------------------------
    # The module holding the kind's modifier (imported when a recipe is compiled).
    modifier: ClassVar[str]
    # The smallest recipe entry of this kind: what the contract test and the docs build from.
    example: ClassVar[dict[str, Any]]
    # A window of dense training: no phase that makes anything sparse may start inside it.
    dense_window: ClassVar[bool] = False
    # What it makes sparse stays so until the run ends (a later dense warm-up cannot undo it).
    lasts_to_end: ClassVar[bool] = False
    # It masks individual weights (of `targets`): two such phases must not share a role.
    masks_weights: ClassVar[bool] = False
    # Why a recipe may hold at most one phase of this kind (None: any number).
    at_most_once: ClassVar[str | None] = None
    # It updates on a cadence (update_every, updates, min_update_interval; recipe/cadence.py).
    scheduled_updates: ClassVar[bool] = False
    # It adds trainable parameters to the model (which DDP must be told may go unused).
    adds_parameters: ClassVar[bool] = False
    # The run folder keeps a few validation images for the report of this kind.
    wants_validation_samples: ClassVar[bool] = False
    # `recipe show --model` prints what each block keeps under it (its modifier's
    # `describe_on`), which depends on the model.
    per_block: ClassVar[bool] = False
    # Why it cannot train under `training.compile` (None: it can).
    not_compilable: ClassVar[str | None] = None

    @classmethod
    def kind_name(cls) -> str:
        """The `kind:` value that selects this class in a recipe."""
        return cls.model_fields["kind"].annotation.__args__[0]

    def describe(self, timeline: Timeline) -> str:
        """Its settings in one line, for `recipe show` (kinds override this)."""
        fields = self.model_dump(mode="json", exclude={"kind", "name", "start", "end"})
        return ", ".join(f"{key} {value}" for key, value in fields.items())


class WindowedPhase(PhaseConfig):
    """A phase that acts over a window."""

    end: Span = Field(Span(1.0, "fraction"), description="When the phase ends.")
