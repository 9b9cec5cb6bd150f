"""Build the timm model a run trains: name resolution, bounds on what a model spec may ask for,
local weights, and offline-safe errors."""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sparsekit.errors import SparsekitError, UsageError

_logger = logging.getLogger(__name__)

# timm modules whose models are plain (non-hierarchical) ViTs sparsekit knows the layout of:
# one sequence of tokens through a stack of `blocks`, each an attention and an MLP.
SUPPORTED_FAMILIES = (
    "timm.models.vision_transformer",
    "timm.models.deit",
    "timm.models.vision_transformer_hybrid",
    "timm.models.eva",
    "timm.models.beit",
    "timm.models.vision_transformer_relpos",
    "timm.models.naflexvit",
)
# timm modules of hierarchical ViTs (stages of windows or pooled grids), out of scope.
HIERARCHICAL_FAMILIES = (
    "swin_transformer",
    "swin_transformer_v2",
    "swin_transformer_v2_cr",
    "mvitv2",
    "levit",
    "maxxvit",
    "pvt_v2",
    "twins",
    "nest",
    "pit",
    "crossvit",
    "cait",
    "tnt",
    "xcit",
    "efficientformer",
    "efficientformer_v2",
    "hiera",
    "davit",
    "focalnet",
    "edgenext",
    "fastvit",
    "mobilevit",
    "gcvit",
    "coat",
    "convit",
    "sequencer",
    "tiny_vit",
    "vitamin",
    "hieradet_sam2",
)

# Keyword arguments of timm.create_model / build_model_with_cfg that are not the architecture:
# they open files, download, wrap the model or place it on a device or dtype. Weights come from
# --checkpoint / --pretrained; the trainer picks the device.
DENIED_MODEL_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "pretrained_filter_fn",
        "pretrained_model_args",
        "checkpoint_path",
        "cache_dir",
        "device",
        "dtype",
        "features_only",
        "out_indices",
        "feature_cfg",
        "feature_cls",
        "model_cfg",
        "kwargs_filter",
        "pruned",
    }
)
# Inclusive bounds on the size arguments of a ViT: larger than any timm ViT, small enough that
# nothing is allocated for an absurd request. img_size and patch_size bound each side.
MODEL_ARG_BOUNDS: dict[str, tuple[int, int]] = {
    "depth": (1, 256),
    "embed_dim": (1, 16384),
    "num_heads": (1, 1024),
    "img_size": (1, 8192),
    "patch_size": (1, 1024),
    "num_classes": (0, 1_000_000),
    "in_chans": (1, 1024),
    "reg_tokens": (0, 1024),
}
MAX_MLP_RATIO = 64.0
MAX_PARAMS = 4_000_000_000  # the largest timm ViT has 2.7e9
MAX_MODEL_ARGS = 64
MAX_STR_LEN = 256
MAX_LIST_LEN = 16
# Weights files --checkpoint reads: safetensors, and torch.save files read with weights_only=True.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Where a training checkpoint wraps its state dict, in the order timm's load_state_dict tries
# them (EMA weights first).
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model: the timm name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _vit_names() -> list[str]:
    import timm

    return sorted(set(timm.list_models("vit_*") + timm.list_models("deit*")))


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name, _vit_names(), n=5, cutoff=0.5)
    return f" Closest timm ViTs: {', '.join(close)}." if close else ""


def resolve_model_name(name: str) -> str:
    """A timm model name for `name`, where short names such as `deit_small` mean the 224 px,
    patch-16 model (`deit_small_patch16_224`).

    Raises:
        SparsekitError: unknown name, with the closest timm names.
    """
    import timm

    known = set(timm.list_models())
    if name in known:
        return name
    for suffix in ("_patch16_224", "_patch16_224.fb_in1k"):
        if name + suffix in known:
            return name + suffix
    raise SparsekitError(
        f"unknown model {name!r}.{_closest(name)} Short names deit_tiny, deit_small, deit_base "
        "(and any timm name with its '_patch16_224' left off) also work; "
        "`timm.list_models('vit_*')` lists the rest."
    )


def check_spec(spec: ModelSpec) -> int:
    """Refuse a model spec sparsekit should not build, before any weight is allocated, and
    return its parameter count. Every spec `create_model` builds goes through it: the trainer's
    (--model-arg), a run folder's and an export manifest's.

    Checked in order: the name is a timm model of a supported family (`SUPPORTED_FAMILIES`); no
    keyword argument opens files, downloads or picks a device or dtype (`DENIED_MODEL_ARGS`);
    values are JSON-like scalars or flat lists of them; sizes are within `MODEL_ARG_BOUNDS` and
    the patch fits the image; timm accepts the arguments and builds a model sparsekit supports
    (on the meta device, which allocates nothing); the model has at most `MAX_PARAMS`
    parameters; and it runs on one image (on the meta device too).

    Raises:
        SparsekitError: what is refused and how to fix it.
    """
    from sparsekit.surgery.targets import check_supported

    _check_name(spec.name)
    _check_kwargs(spec)
    model = _build(spec, meta=True)
    check_supported(model)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and min(grid) < 1:
        image, patch = tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size)
        raise SparsekitError(
            f"{spec.name} with {_args(spec.kwargs)} has images of {_size(image)} px but patches "
            f"of {_size(patch)} px: an image holds no whole patch. Give an img_size of at least "
            f"the patch size (--img-size), or a smaller patch_size (--patch-size)."
        )
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise SparsekitError(
            f"{spec.name} with {_args(spec.kwargs)} would have {params:,} parameters, more than "
            f"sparsekit builds ({MAX_PARAMS:,}; the largest timm ViT has 2.7e9); nothing was "
            "allocated. Lower depth, embed_dim, img_size or num_classes."
        )
    _check_forward(spec, model)
    return params


def _check_forward(spec: ModelSpec, model: nn.Module) -> None:
    """Run the meta-device model on one image (shapes only, nothing computed): timm builds some
    argument combinations it cannot run (BEiT with an embed_dim that num_heads does not divide)."""
    import torch

    from sparsekit.surgery.geometry import input_size

    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, *input_size(model), device="meta"))
    except NotImplementedError:
        return  # an operation without a meta kernel: nothing to learn here
    except Exception as err:  # noqa: BLE001 - any failure of timm's forward is the spec's
        if "meta" in str(err).lower():
            return  # code that reads values, which meta tensors do not hold
        raise SparsekitError(
            f"timm builds {spec.name} with {_args(spec.kwargs)} but cannot run it: "
            f"{type(err).__name__}: {_first_line(err)}. Change or remove these model arguments "
            "(embed_dim must be a multiple of num_heads, the image a whole number of patches)."
        ) from None


def _check_name(name: Any) -> None:
    from timm.models import model_entrypoint

    if not isinstance(name, str) or not name or len(name) > MAX_STR_LEN:
        raise SparsekitError(
            f"model name {str(name)[:80]!r} is not a timm model name; give one such as "
            "deit_small_patch16_224 (`timm.list_models('vit_*')` lists them)."
        )
    try:
        family = model_entrypoint(name).__module__
    except (KeyError, RuntimeError, ValueError):
        raise SparsekitError(
            f"unknown model {name!r}: timm has no model of that name.{_closest(name)} "
            "`timm.list_models('vit_*')` and `timm.list_models('deit*')` list the models "
            "sparsekit supports."
        ) from None
    if family not in SUPPORTED_FAMILIES:
        kind = (
            "a hierarchical ViT (stages of windows or pooled grids), which is out of scope"
            if family.rsplit(".", 1)[-1] in HIERARCHICAL_FAMILIES
            else "not a plain ViT whose layout sparsekit knows"
        )
        raise SparsekitError(
            f"{name} is not supported: it is built by {family}, {kind}. sparsekit supports the "
            f"plain ViTs of {', '.join(f.rsplit('.', 1)[1] for f in SUPPORTED_FAMILIES)} "
            "(vit_*, deit*, eva*, beit*, vit_relpos_*, naflexvit_*, and the hybrid vit_*_r50_* "
            "models); docs/support.md lists every name and what works on it."
        )


def _check_kwargs(spec: ModelSpec) -> None:
    kwargs = spec.kwargs
    if not isinstance(kwargs, dict):
        raise SparsekitError(
            f"the model arguments of {spec.name} are a {type(kwargs).__name__}, not a mapping of "
            "argument names to values; give them as KEY=VALUE (--model-arg depth=6)."
        )
    if len(kwargs) > MAX_MODEL_ARGS:
        raise SparsekitError(
            f"{spec.name} is given {len(kwargs)} model arguments; a ViT takes at most "
            f"{MAX_MODEL_ARGS}. Give only the arguments that differ from the model's defaults."
        )
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or len(key) > MAX_STR_LEN:
            raise SparsekitError(
                f"model argument {str(key)[:80]!r} of {spec.name} is not an argument name; give "
                "timm keyword arguments such as depth or qk_norm."
            )
        if key in DENIED_MODEL_ARGS:
            raise SparsekitError(
                f"{key!r} (given for {spec.name}) is not a model argument sparsekit passes to "
                "timm: a model spec describes the architecture only, and never opens files, "
                "downloads, or picks a device or dtype. Remove it; load weights with --checkpoint "
                "FILE.safetensors (or timm's with --pretrained), and choose the device with "
                "--device."
            )
        _check_value(spec.name, key, value)
        if key in MODEL_ARG_BOUNDS and value is not None:
            _check_bound(spec.name, key, value)
    image, patch = _pair(kwargs.get("img_size")), _pair(kwargs.get("patch_size"))
    if image and patch and any(p > i for i, p in zip(image, patch, strict=True)):
        raise SparsekitError(
            f"{spec.name}: patch_size {_size(patch)} is larger than img_size {_size(image)}, "
            "so an image holds no whole patch. Give an img_size of at least the patch size "
            "(--img-size), or a smaller patch_size (--patch-size)."
        )
    ratio = kwargs.get("mlp_ratio")
    if ratio is not None and (
        isinstance(ratio, bool)
        or not isinstance(ratio, int | float)
        or not 0 < ratio <= MAX_MLP_RATIO
    ):
        raise SparsekitError(
            f"mlp_ratio {ratio!r} for {spec.name} is out of bounds: give a number above 0 and at "
            f"most {MAX_MLP_RATIO:g} (the MLP width is embed_dim x mlp_ratio; 4 is usual)."
        )


def _check_value(name: str, key: str, value: Any) -> None:
    items = value if isinstance(value, list | tuple) else [value]
    ok = len(items) <= MAX_LIST_LEN and all(_is_scalar(v) for v in items)
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise SparsekitError(
            f"model argument {key}={shown} of {name} is not a plain value: model arguments are "
            f"numbers, booleans, null, strings of at most {MAX_STR_LEN} characters, or flat "
            f"lists of at most {MAX_LIST_LEN} of them (img_size: [32, 32]). Objects, nested lists, "
            "NaN and infinity are refused."
        )


def _is_scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_STR_LEN


def _check_bound(name: str, key: str, value: Any) -> None:
    low, high = MODEL_ARG_BOUNDS[key]
    sides = _pair(value) if key in ("img_size", "patch_size") else None
    if sides is None:
        sides = (value,) if isinstance(value, int) and not isinstance(value, bool) else None
    if sides is None or not all(low <= s <= high for s in sides):
        pair = " (or a pair of them, [height, width])" if key in ("img_size", "patch_size") else ""
        raise SparsekitError(
            f"model argument {key}={value!r} of {name} is out of bounds: give an integer from "
            f"{low} to {high}{pair}. The bounds are above any timm ViT; larger values are refused "
            "before any memory is allocated."
        )


def _pair(value: Any) -> tuple[int, ...] | None:
    """An image or patch size as (height, width) of ints, or None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    return None


def _size(pair: tuple[int, ...]) -> str:
    return str(pair[0]) if len(set(pair)) == 1 else "x".join(str(s) for s in pair)


def _args(kwargs: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its default arguments"
    return text if len(text) <= 300 else text[:297] + "..."


def _build(spec: ModelSpec, meta: bool = False, pretrained: bool = False) -> nn.Module:
    """timm's model for `spec`: on the meta device (shapes only, nothing allocated) or for real,
    with timm's refusals of the arguments as SparsekitError."""
    import timm
    import torch

    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
        return timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)
    except Exception as err:
        if pretrained:
            raise SparsekitError(
                f"cannot load pretrained weights for {spec.name}: {_first_line(err)}. This machine "
                "may be offline: download the weights elsewhere, save them as safetensors and pass "
                "--checkpoint FILE.safetensors instead of --pretrained."
            ) from None
        raise SparsekitError(
            f"timm cannot build {spec.name} with {_args(spec.kwargs)}: "
            f"{type(err).__name__}: {_first_line(err)}. Change or remove these model arguments "
            "(for example embed_dim must be a multiple of num_heads, and act_layer a timm "
            "activation name such as gelu)."
        ) from None


def create_model(
    spec: ModelSpec,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    note: Callable[[str], None] | None = None,
) -> nn.Module:
    """Check `spec` (`check_spec`), build it with timm, then load timm weights (`pretrained`)
    or a local weights file (`checkpoint`, see `load_weights`; never downloads). What was
    adapted to the model (a fresh head, resampled position embeddings) is told to `note`, one
    line each (logged at info level when `note` is None).

    Raises:
        SparsekitError: a refused spec, weights cannot be fetched (offline), or the checkpoint
            cannot be read or does not fit.
        UsageError: both `pretrained` and `checkpoint`.
    """
    from sparsekit.surgery.targets import check_supported

    if pretrained and checkpoint is not None:
        raise UsageError(
            f"--pretrained and --checkpoint {checkpoint} both choose the starting weights; give "
            "one of them (--checkpoint loads a local file and never downloads)."
        )
    check_spec(spec)
    model = _build(spec, pretrained=pretrained)
    check_supported(model)
    if checkpoint is not None:
        for line in load_weights(model, Path(checkpoint)):
            (note or _logger.info)(line)
    return model


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Load a weights file into `model` the way timm loads pretrained weights, and return a
    line for each thing adapted to the model.

    The file is a `.safetensors` file, or a `.pth`/`.pt`/`.bin` file read with
    `torch.load(weights_only=True)` (a pickle of Python objects is refused, never run). It
    holds a state dict, or one wrapped under `state_dict_ema`, `model_ema`, `state_dict` or
    `model` (timm's order: EMA weights first); `module.` and `_orig_mod.` prefixes are dropped.
    Then, as timm's `load_pretrained` does: timm's ViT `checkpoint_filter_fn` resamples the
    position embeddings (another image or patch size) and the patch embedding (another patch
    size) and converts known foreign layouts; a patch embedding of other input channels is
    converted (`adapt_input_conv`); and a head of another number of classes is left out, so
    the model keeps its freshly initialised one. Anything else that does not fit is refused.

    Raises:
        SparsekitError: the file is missing, unreadable, refused, or does not fit `model`.
    """
    state = read_state_dict(path)
    adapted, reset, notes = _adapt(model, state, path)
    detail = misfit(model.state_dict(), adapted, "model", left_out=reset)
    if detail:
        raise SparsekitError(
            f"{path}: weights do not fit {type(model).__name__} ({detail}). Build the model with "
            "the same --model and --model-arg the weights were trained with: another number of "
            "classes, image size, patch size or input channels is adapted, other differences "
            "(depth, width, heads, tokens) are not."
        )
    model.load_state_dict(adapted, strict=False)
    return notes


def read_state_dict(path: Path, option: str = "--checkpoint") -> dict[str, Any]:
    """The state dict in a weights file: safetensors, or torch.load(weights_only=True) of a
    .pth/.pt/.bin file, unwrapped and with wrapper prefixes removed (timm's clean_state_dict).
    `option` names where the path was given, in the errors (a recipe field reads it too).

    Raises:
        SparsekitError: unknown suffix, no such file, unreadable or refused, no state dict.
    """
    import torch
    from timm.models import clean_state_dict

    kinds = ", ".join(WEIGHT_SUFFIXES)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise SparsekitError(
            f"{path}: {option} takes a weights file ending in {kinds}, not "
            f"{path.suffix or 'a name without a suffix'!r}. Save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') or "
            "torch.save(model.state_dict(), 'weights.pth')."
        )
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise SparsekitError(
            f"{path}: no such checkpoint file. {option} takes a weights file ({kinds}); "
            "check the path."
        )
    read = _read_safetensors if path.suffix.lower() == ".safetensors" else _read_torch
    state = read(path)
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    tensors = isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )
    if not tensors or not state:
        if isinstance(state, dict):
            odd = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
            what = f"entries that are not tensors: {', '.join(odd[:3])}" if odd else "nothing"
        else:
            what = f"a {type(state).__name__}"
        raise SparsekitError(
            f"{path}: holds no state dict ({what}). {option} reads a mapping of parameter "
            f"names to tensors, or one wrapped under {', '.join(map(repr, STATE_DICT_KEYS))}; "
            "save one with torch.save(model.state_dict(), path)."
        )
    return clean_state_dict(state)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise SparsekitError(
            f"{path}: not a readable safetensors file ({_first_line(err)}); it may be truncated "
            "or damaged. Save the weights again with safetensors.torch.save_file(state_dict, "
            "path)."
        ) from None


def _read_torch(path: Path) -> Any:
    """torch.load with weights_only=True, never otherwise: tensors and plain containers only
    (and argparse.Namespace, which timm's training checkpoints hold, as timm allows)."""
    import argparse
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if needed:
            raise SparsekitError(
                f"{path}: refused: it pickles Python objects (it needs {needed.group(1)}), not "
                "only tensors, and loading it could run code, so sparsekit does not: .pth, .pt "
                "and .bin files are read with torch.load(weights_only=True) only. If you trust "
                "the file, load it yourself and save the weights alone: "
                "torch.save(model.state_dict(), 'weights.pth') or "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')."
            ) from None
        why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
        detail = why.group(1).strip() if why else _first_line(err)
    except EOFError:
        detail = "it ends before any data"
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the user's to fix
        detail = f"{type(err).__name__}: {_first_line(err).split('. ')[0][:200]}"
    raise SparsekitError(
        f"{path}: not a readable PyTorch weights file ({detail}): it may be truncated, damaged "
        "or of another format, and torch.load(weights_only=True) reads only tensors and plain "
        "containers. Save the weights again with torch.save(model.state_dict(), path) or "
        "safetensors.torch.save_file(model.state_dict(), path)."
    )


def _adapt(
    model: nn.Module, state: dict[str, Any], path: Path
) -> tuple[dict[str, Any], list[str], list[str]]:
    """timm's adaptation of pretrained weights to `model` (`load_pretrained`): the ViT
    checkpoint filter, input channels, a head of another number of classes left out. Returns
    the adapted state, the model's keys left at their initialisation, and a line per change."""
    from timm.models import adapt_input_conv

    checkpoint_filter_fn, options = _checkpoint_filter(model)
    try:
        adapted = checkpoint_filter_fn(dict(state), model, **options)
    except Exception as err:  # noqa: BLE001 - timm's filter fails on weights of another layout
        raise SparsekitError(
            f"{path}: timm cannot adapt these weights to {type(model).__name__} "
            f"({type(err).__name__}: {_first_line(err)}). Build the model with the same --model "
            "and --model-arg the weights were trained with."
        ) from None
    own = model.state_dict()
    notes = []
    before, after = state.get("pos_embed"), adapted.get("pos_embed")
    if before is not None and after is not None and before.shape != after.shape:
        notes.append(
            f"{path.name}: position embeddings resampled from {before.shape[1]} to "
            f"{after.shape[1]} tokens for a {'x'.join(map(str, model.patch_embed.grid_size))} grid "
            "of patches (another image or patch size than the file's)."
        )
    key = "patch_embed.proj.weight"
    weight = adapted.get(key)
    if weight is not None and key in own and weight.ndim == 4:
        source = state.get(key)
        if source is not None and source.shape[2:] != weight.shape[2:]:
            notes.append(
                f"{path.name}: patch embedding resampled from {_size(tuple(source.shape[2:]))} to "
                f"{_size(tuple(weight.shape[2:]))} px patches."
            )
        if weight.shape[1] != own[key].shape[1] and weight.shape[0] == own[key].shape[0]:
            try:
                adapted[key] = adapt_input_conv(own[key].shape[1], weight)
                notes.append(
                    f"{path.name}: patch embedding converted from {weight.shape[1]} to "
                    f"{own[key].shape[1]} input channels."
                )
            except NotImplementedError:
                pass  # reported as a shape that does not fit
    classifiers = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    heads = [f"{c}.{p}" for c in classifiers for p in ("weight", "bias")]
    other = [
        k for k in heads if k in adapted and (k not in own or own[k].shape != adapted[k].shape)
    ]
    reset: list[str] = []
    if other:  # timm drops the whole classifier when the number of classes differs
        classes = adapted[other[0]].shape[0]
        for k in heads:
            adapted.pop(k, None)
        reset = [k for k in heads if k in own]
        if reset:
            notes.append(
                f"{path.name}: the file's head has {classes} classes, the model "
                f"{model.num_classes}: {', '.join(reset)} start fresh (timm's initialisation)."
            )
        else:
            notes.append(
                f"{path.name}: the file's head ({classes} classes) is left out: the model has "
                "no head (num_classes 0)."
            )
    return adapted, reset, notes


def _checkpoint_filter(model: nn.Module) -> tuple[Callable[..., dict], dict[str, Any]]:
    """The pretrained-weights filter timm's builder of `model` uses (each family converts its
    own foreign layouts and resamples its own position tables), with the options it passes."""
    import importlib

    from timm.models import is_model, model_entrypoint

    name = str(getattr(model, "pretrained_cfg", {}).get("architecture", ""))
    family = model_entrypoint(name).__module__ if is_model(name) else type(model).__module__
    if family in ("timm.models.vision_transformer", "timm.models.deit"):
        from timm.models.vision_transformer import checkpoint_filter_fn

        # As timm's ViT builders pass it: deit3 layer scales remapped (harmless elsewhere);
        # FlexiViT resamples bilinear without antialiasing.
        options: dict[str, Any] = {"adapt_layer_scale": True}
        if "flexi" in name:
            options.update(interpolation="bilinear", antialias=False)
        return checkpoint_filter_fn, options
    return importlib.import_module(family).checkpoint_filter_fn, {}


def misfit(
    own: dict[str, Any], state: dict[str, Any], what: str, left_out: Iterable[str] = ()
) -> str:
    """What keeps `state` (a file's tensors) from loading into a module whose state dict is
    `own` (called `what` in the text): missing, unexpected and misshapen keys, the first three
    of each; empty when it fits. Keys in `left_out` may be missing."""
    missing = sorted(set(own) - set(state) - set(left_out))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    shapes = [f"{k} (file {_shape(state[k].shape)}, {what} {_shape(own[k].shape)})" for k in wrong]
    return "; ".join(
        f"{label}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    )


def _shape(shape: Any) -> str:
    return "x".join(str(s) for s in shape) or "scalar"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
