"""SViTE+: learnable token selection, with the kept tokens really removed at inference.

Unlike the reference implementation, which multiplies unselected tokens by 0 (the sequence
keeps its length, nothing is saved) and selects at random at test time, evaluation and export
here select deterministically and gather the kept tokens, so later blocks run on a shorter
sequence. Training masks instead, exactly: dropped tokens are hidden from every later
attention, so training sees the same function the gathered model computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.modifiers.base import Modifier
from sparsekit.modifiers.registry import register
from sparsekit.recipe.schema import TokenSelectPhase
from sparsekit.surgery.tokens import Placement, TokenSelection, kept_count

if TYPE_CHECKING:
    from sparsekit.modifiers.start_state import StartState
    from sparsekit.session import Session
    from sparsekit.timeline import Timeline


@register(TokenSelectPhase)
class TokenSelect(Modifier):
    """Selection is on from `start_step` to the end of the run; the Gumbel temperature anneals
    from `temperature_start` to `temperature_end` over `[start_step, end_step]`, geometrically
    or linearly (`temperature_decay`), and stays at `temperature_end` after it."""

    config: TokenSelectPhase

    def __init__(
        self,
        config: TokenSelectPhase,
        model: nn.Module,
        start_step: int,
        end_step: int,
        placements: list[Placement],
    ):
        super().__init__(config, model, start_step, end_step)
        self.placements = placements
        # The scorers join the model now, at compile time, so the optimizer built afterwards
        # (and every checkpoint) includes them.
        self.selection = TokenSelection(model, placements, self.edits)
        self.selection.enabled = False
        self._checked_optimizer = False

    @classmethod
    def build(
        cls, config: TokenSelectPhase, model: nn.Module, timeline: Timeline, seed: int
    ) -> TokenSelect:
        placements = [Placement(p.before_block, p.keep_ratio) for p in config.resolved()]
        return cls(
            config, model, timeline.steps(config.start), timeline.steps(config.end), placements
        )

    @classmethod
    def describe_on(cls, config: TokenSelectPhase, index: int, model: nn.Module, label: str) -> str:
        """The patch tokens each selector keeps in eval and export."""
        patches = model.patch_embed.num_patches
        prefix = model.num_prefix_tokens
        parts = []
        for placement in config.resolved():
            kept = kept_count(patches, placement.keep_ratio)
            others = "the class token" if prefix == 1 else f"its {prefix} prefix tokens"
            parts.append(
                f"before block {placement.before_block}: keeps {kept} of {patches} patch tokens "
                f"(ceil({placement.keep_ratio:g} x {patches})), {kept + prefix} tokens with "
                f"{others}"
            )
            patches = kept
        return f"phases[{index}] token_select on {label}:\n  " + "\n  ".join(parts)

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def temperature(self, step: int) -> float:
        """The temperature of the step after `step` completed steps."""
        return annealed_temperature(
            self.config.temperature_start,
            self.config.temperature_end,
            (step - self.start_step) / max(1, self.end_step - self.start_step),
            self.config.temperature_decay,
        )

    def on_batch_start(self, session: Session) -> None:
        self.selection.enabled = self.active(session.step)
        self.selection.gather_in_training = self.compute == "active"
        self.selection.temperature = self.temperature(session.step)
        if self.selection.enabled and not self._checked_optimizer:
            self._check_optimizer(session)

    def _check_optimizer(self, session: Session) -> None:
        self._checked_optimizer = True
        if session.optimizer is None:
            return
        trained = {id(p) for group in session.optimizer.param_groups for p in group["params"]}
        if any(id(p) not in trained for p in self.selection.scorer_parameters()):
            raise SparsekitError(
                "token_select added a scorer to the model (model.token_selectors), but the "
                "optimizer does not train it. Build the optimizer after compiling the recipe: "
                "modifiers = sparsekit.compile_recipe(recipe, model, timeline), then "
                "optimizer = ...(model.parameters()), then Session(model, optimizer, modifiers, "
                "timeline)."
            )

    def start_from(self, start: StartState) -> None:
        """The scorers start from the export's (loaded with its weights), so the selectors
        must be the export's: the same blocks and keep ratios."""
        mine = _placed(self.placements)
        theirs = _placed(start.placements)
        if not start.placements:
            raise SparsekitError(
                "the export has no token selectors (its run had no token_select phase), so "
                f"there are no scorer weights to start this phase's ({mine}) from. Remove the "
                "phase to fine-tune without token selection, or start from an export that "
                "selects tokens."
            )
        if sorted(self.placements, key=_at) != sorted(start.placements, key=_at):
            raise SparsekitError(
                f"the export selects tokens {theirs}, this phase {mine}; its scorers' weights "
                "fit only the same selectors: give the phase the export's keep_ratio and "
                "before_block (or placements)."
            )

    def finalize(self, session: Session) -> None:
        self.selection.enabled = True  # the trained model selects, as its export will

    def token_placements(self) -> list[Placement]:
        return list(self.placements)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the scorers are model parameters; the temperature follows from the step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore besides the model's own weights."""


def _at(placement: Placement) -> tuple[int, float]:
    return placement.before_block, placement.keep_ratio


def _placed(placements: Any) -> str:
    """Selectors in words, in block order: "keep 0.7 before block 0"."""
    ordered = sorted(placements, key=_at)
    return ", ".join(f"keep {p.keep_ratio:g} before block {p.before_block}" for p in ordered)


def annealed_temperature(start: float, end: float, progress: float, decay: str) -> float:
    """Gumbel temperature at `progress` (clamped to [0, 1]) of the annealing window.

    geometric: start * (end / start) ** p. linear: start + (end - start) * p, the reference
    code's `get_tau(10, 0.1, ite_step, total_iteration)` (SViTE engine.py:21-23, 48), whose
    window is the whole run: `ite_step` completed iterations of `len(data_loader) * epochs`
    (engine.py:37), so a phase with start 0 and end "100%" anneals exactly as it does.
    """
    p = min(max(progress, 0.0), 1.0)
    if decay == "geometric":
        return start * (end / start) ** p
    if decay == "linear":
        return start + (end - start) * p
    raise ValueError(f"unknown temperature_decay {decay!r}; use 'geometric' or 'linear'")
