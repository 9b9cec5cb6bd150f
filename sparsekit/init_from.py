"""Start a run from a sparsekit export: `sparsekit apply RECIPE --init-from EXPORT`.

The export is read by its own loader (`read_export`: format and hash checked, a damaged or
edited file refused; `built_export`: the model bounds) and brought back to full size: a masked
export as it is, a compacted one with its kept heads and neurons put back into the full-size
model of its architecture, the dropped ones zero (`surgery.expand`). That `StartState` is the
starting state of the recipe's phases: each phase that holds sparsity takes the export's as its
first masks (`Modifier.start_from`) or says what does not fit, and whatever the export holds
(zero weights, dropped units, token selectors) must be held by some phase. Then the export's
weights are loaded, the classifier left fresh when the data has another number of classes.

The architecture is the export's: `--model` may be left out (given, it must name the export's
model), `--img-size` and `--patch-size` must be the export's, `--model-arg` may change only
what leaves the weights' shapes alone (dropout rates, say). The run folder records the export
and its hash, so `--resume` can check that it is given the same export again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit.errors import SparsekitError, UsageError, user_message
from sparsekit.export.loader import built_export, read_export
from sparsekit.models import ModelSpec, create_model, resolve_model_name
from sparsekit.modifiers import Modifier
from sparsekit.modifiers.start_state import StartState
from sparsekit.recipe.targets import ROLES
from sparsekit.surgery.expand import expand_, zeroed_units
from sparsekit.surgery.layouts import gateable_groups
from sparsekit.surgery.targets import find_targets
from sparsekit.surgery.tokens import Placement
from sparsekit.surgery.unit_slices import unit_positions
from sparsekit.surgery.units import UnitGroup

# Model arguments a run decides from its data and recipe, as `trainer.model_spec` does.
RUN_DECIDES = ("num_classes", "in_chans", "img_size", "patch_size", "drop_path_rate")


@dataclass(frozen=True)
class ExportStart:
    """A checked export at full size: what the run builds and what its phases start from."""

    path: Path
    sha256: str  # the export's integrity hash (its manifest's), recorded in the run folder
    compact: bool
    spec: ModelSpec  # the export's own model
    img_size: int | None  # None: not square (the trainer trains square images)
    patch_size: int | None
    in_chans: int
    num_classes: int
    classifier: tuple[str, ...]  # its classifier's tensors, left fresh for other classes
    state: StartState


def read_start(path: str | Path) -> ExportStart:
    """Read the export at `path` (its folder or model.safetensors) back at full size. Torch's
    random state is left as it was: reading an export draws nothing a run would see.

    Raises:
        SparsekitError: anything `read_export` and `load_compact` refuse (missing, damaged,
            edited, another format, out of bounds, inconsistent).
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        manifest, tensors = read_export(path)
        model = built_export(path, manifest, tensors)
        spec = ModelSpec(manifest.model, manifest.model_kwargs)
        if manifest.compact:
            full = create_model(spec)
            groups = _unit_groups(full)
            keeps = expand_(full, model, groups, _unit_groups(model))
        else:
            full = model
            groups = _unit_groups(full)
            keeps = zeroed_units(list(groups.values()))
    weights = {k: v.detach().cpu().clone() for k, v in full.state_dict().items()}
    for key, value in model.state_dict().items():  # the token scorers of a compacted export
        weights.setdefault(key, value.detach().cpu().clone())
    names = {id(p): n for n, p in full.named_parameters()}
    dropped = unit_positions(list(groups.values()), {n: ~k for n, k in keeps.items()})
    state = StartState(
        source=str(path),
        weights=weights,
        unit_keeps=keeps,
        dropped={names[id(t)]: where.cpu() for t, where in dropped},
        placements=tuple(Placement(t.before_block, t.keep_ratio) for t in manifest.token_selection),
    )
    classifier = (getattr(full, "pretrained_cfg", None) or {}).get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    embed = full.patch_embed
    return ExportStart(
        path=path,
        sha256=manifest.sha256,
        compact=manifest.compact,
        spec=spec,
        img_size=_side(embed.img_size),
        patch_size=_side(embed.patch_size),
        in_chans=embed.proj.in_channels,
        num_classes=full.num_classes,
        classifier=tuple(k for k in weights if any(k.startswith(f"{c}.") for c in classifier)),
        state=state,
    )


def _unit_groups(model: nn.Module) -> dict[str, UnitGroup]:
    """Head and neuron groups by name; a kind sparsekit cannot gate in this model is left out
    (its units read as whole)."""
    return {g.name: g for g in gateable_groups(model)}


def _side(size: Any) -> int | None:
    sides = tuple(size) if isinstance(size, list | tuple) else (size,)
    return int(sides[0]) if sides and all(s == sides[0] for s in sides) else None


# --- the run's options ----------------------------------------------------------------------
def check_start_options(config: Any) -> None:
    """Options that cannot go with --init-from (or without it), before anything is read.

    Raises:
        UsageError: no --model and no --init-from; --init-from with --pretrained or
            --checkpoint.
    """
    if config.init_from is None:
        if not config.model:
            raise UsageError(
                "give --model NAME (a timm ViT, e.g. deit_tiny), or --init-from EXPORT to start "
                "from a sparsekit export, whose model it then is."
            )
        return
    for option, given in (("--pretrained", config.pretrained), ("--checkpoint", config.checkpoint)):
        if given:
            raise UsageError(
                f"--init-from {config.init_from} and {option} both choose the starting weights; "
                "give one of them (--init-from starts from the export's weights and sparsity)."
            )


def export_name(path: str | Path) -> str:
    """The export's folder name, for the default run folder (runs/<recipe>-<export>)."""
    path = Path(path)
    return (path.parent if path.suffix == ".safetensors" else path).resolve().name


def run_config(config: Any, start: ExportStart) -> Any:
    """`config` (a `RunConfig`) with the export's architecture: its model, image and patch size
    and model arguments (those the data and recipe decide aside), `--model-arg` on top.

    Raises:
        UsageError: --model, --img-size or --patch-size that are not the export's.
        SparsekitError: an export of non-square images or patches.
    """
    name = start.spec.name
    if config.model and resolve_model_name(config.model) != name:
        raise UsageError(
            f"--model {config.model}: the export {start.path} is {name}, and its architecture "
            "is what --init-from trains; leave --model out, or give the export's model."
        )
    if start.img_size is None or start.patch_size is None:
        raise SparsekitError(
            f"--init-from {start.path}: the export's images or patches are not square, and "
            "`sparsekit apply` trains square images; fine-tune it with your own loop."
        )
    for option, given, theirs in (
        ("--img-size", config.img_size, start.img_size),
        ("--patch-size", config.patch_size, start.patch_size),
    ):
        if given is not None and given != theirs:
            raise UsageError(
                f"{option} {given}: the export {start.path} was trained with {theirs}, and its "
                f"position embeddings and patch embedding fit only that; leave {option} out "
                f"(it is {theirs}) or give {theirs}."
            )
    kept = {k: v for k, v in start.spec.kwargs.items() if k not in RUN_DECIDES}
    return dataclasses.replace(
        config,
        model=name,
        img_size=start.img_size,
        patch_size=start.patch_size,
        extra={**kept, **config.extra},
    )


# --- the phases' starting state ----------------------------------------------------------------
def start_phases(
    modifiers: list[Modifier],
    model: nn.Module,
    start: ExportStart,
    note: Callable[[str], None] = lambda line: None,
) -> None:
    """Give every phase the export's state, check that the phases hold all of it, and load the
    export's weights into `model` (the compiled recipe's, before the optimizer is built).

    Raises:
        SparsekitError: the data's images have other channels, --model-arg changed a shape, a
            phase does not fit the export, or something the export holds is held by no phase;
            each says what differs and how to fix it.
    """
    state = _state_for(model, start, note)
    for index, modifier in enumerate(modifiers):
        try:
            modifier.start_from(state)
        except SparsekitError as err:
            raise SparsekitError(
                f"--init-from {start.path}: phases[{index}] ({modifier.kind}) does not fit the "
                f"export: {user_message(err)}"
            ) from None
    _check_held(modifiers, model, start, state)
    own = model.state_dict()
    missing = set(own) - set(state.weights) - set(start.classifier)
    unexpected = set(state.weights) - set(own)
    if missing or unexpected:
        names = sorted(missing | unexpected)
        raise SparsekitError(
            f"--init-from {start.path}: the model this run builds and the export's tensors do "
            f"not match ({', '.join(names[:3])}); leave out any --model-arg that changes the "
            "architecture."
        )
    model.load_state_dict(state.weights, strict=False)
    note(_described(start, state, model))


def _state_for(model: nn.Module, start: ExportStart, note: Callable[[str], None]) -> StartState:
    """The export's state for `model`: its classifier left out when the data has another
    number of classes (it starts fresh, as with --checkpoint), every other shape checked."""
    channels = model.patch_embed.proj.in_channels
    if channels != start.in_chans:
        raise SparsekitError(
            f"--init-from {start.path}: the export takes {start.in_chans}-channel images, but "
            f"--data gives {channels}-channel ones (digits are 1-channel, image folders 3); "
            "fine-tune it on images of its kind."
        )
    state = start.state
    if model.num_classes != start.num_classes:
        note(
            f"the export classifies {start.num_classes} classes and the data has "
            f"{model.num_classes}: its classifier ({', '.join(start.classifier)}) starts fresh, "
            "as with --checkpoint."
        )
        state = state.without(set(start.classifier))
    own = model.state_dict()
    for key, value in state.weights.items():
        if key in own and own[key].shape != value.shape:
            raise SparsekitError(
                f"--init-from {start.path}: {key} is {tuple(value.shape)} in the export but "
                f"{tuple(own[key].shape)} in the model this run builds; the architecture is "
                "the export's: leave out the --model-arg that changes it."
            )
    return state


def _check_held(
    modifiers: list[Modifier], model: nn.Module, start: ExportStart, state: StartState
) -> None:
    """Every part of the export's sparsity must be held by some phase: otherwise training would
    quietly lose it (zeros filled in, selectors dropped) or the export of the run would keep
    units the export had removed."""
    loose: list[str] = []
    if state.placements and not any(m.token_placements() for m in modifiers):
        loose.append(f"its token selectors ({_tokens(state.placements)})")
    units = {n for m in modifiers for n in m.units_owned()}
    dropping = {n: k for n, k in state.unit_keeps.items() if not k.all() and n not in units}
    if dropping:
        name, keep = next(iter(dropping.items()))
        loose.append(
            f"the heads or neurons it dropped in {len(dropping)} blocks ({name} keeps "
            f"{int(keep.sum())} of {keep.numel()})"
        )
    owned = {n for m in modifiers for n in m.masks_owned()}
    zeros = [
        f"{t.name}.weight"
        for t in find_targets(model, list(ROLES))
        if f"{t.name}.weight" not in owned and state.loose_zeros(f"{t.name}.weight")
    ]
    if zeros:
        more = f" and {len(zeros) - 1} more" if len(zeros) > 1 else ""
        loose.append(f"the zero weights of {zeros[0]}{more}")
    if loose:
        raise SparsekitError(
            f"--init-from {start.path}: no phase of the recipe holds {'; '.join(loose)}, so "
            "training would lose them. Add a fixed_sparsity phase, which holds everything the "
            "export has (recipes/finetune_export.yaml), or phases that take each part: "
            "head_prune_grow with the export's heads and mlp_neurons, unstructured_dst or "
            "magnitude_prune with its sparsity over these weights' roles, token_select with its "
            "selectors."
        )


def _described(start: ExportStart, state: StartState, model: nn.Module) -> str:
    """One line: what the run starts from."""
    parts = []
    heads = [k for n, k in state.unit_keeps.items() if n.endswith(".attn")]
    neurons = [k for n, k in state.unit_keeps.items() if n.endswith(".mlp")]
    for what, keeps in (("heads", heads), ("MLP neurons", neurons)):
        if keeps and not all(k.all() for k in keeps):
            kept = sum(int(k.sum()) for k in keeps)
            parts.append(f"{kept:,} of {sum(k.numel() for k in keeps):,} {what}")
    targets = [f"{t.name}.weight" for t in find_targets(model, list(ROLES))]
    size = sum(state.weights[n].numel() for n in targets if n in state.weights)
    zero = sum(int(state.weights[n].eq(0).sum()) for n in targets if n in state.weights)
    parts.append(f"{zero / max(1, size):.1%} of the weights zero")
    if state.placements:
        parts.append(f"token selectors {_tokens(state.placements)}")
    kind = "compacted" if start.compact else "masked"
    return f"starting from {start.path} ({kind} export of {start.spec.name}): {', '.join(parts)}."


def _tokens(placements: tuple[Placement, ...]) -> str:
    return ", ".join(f"keep {p.keep_ratio:g} before block {p.before_block}" for p in placements)


# --- the run folder ------------------------------------------------------------------------
def start_record(start: ExportStart) -> dict[str, str]:
    """What run.json keeps of the export: where it was and its hash."""
    return {"path": str(start.path.resolve()), "sha256": start.sha256}


def check_resumed_start(recorded: Any, start: dict[str, str] | None, out: Path) -> None:
    """--resume continues from the export the run started from, or from none if it started
    from none (`recorded`: run.json's `init_from`; `start`: `start_record` of the export
    given now).

    Raises:
        SparsekitError: --init-from missing, not wanted, or another export (hash) than the
            one recorded.
    """
    if recorded is None and start is None:
        return
    if recorded is None:
        raise SparsekitError(
            f"--resume: {out} was not started from an export; resume it without --init-from."
        )
    if start is None:
        raise SparsekitError(
            f"--resume: {out} was started from the export {recorded.path}; give "
            f"--init-from {recorded.path} again to resume it."
        )
    if recorded.sha256 != start["sha256"]:
        raise SparsekitError(
            f"--resume: {start['path']} is not the export {out} was started from "
            f"({recorded.path}): its hash differs, so it was exported again or is another "
            "export. Resume with the export the run started from, or start a new --output "
            "folder."
        )
