"""Build the timm model a run trains: name resolution, local weights, and offline-safe errors."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sparsekit.errors import SparsekitError

# timm modules whose models are (subclasses of) timm's VisionTransformer.
SUPPORTED_FAMILIES = {"timm.models.vision_transformer", "timm.models.deit"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model: the timm name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _vit_names() -> list[str]:
    import timm

    return sorted(set(timm.list_models("vit_*") + timm.list_models("deit*")))


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
    close = difflib.get_close_matches(name, _vit_names(), n=5, cutoff=0.5)
    hint = f" Closest timm ViTs: {', '.join(close)}." if close else ""
    raise SparsekitError(
        f"unknown model {name!r}.{hint} Short names deit_tiny, deit_small, deit_base (and any "
        "timm name with its '_patch16_224' left off) also work; `timm.list_models('vit_*')` "
        "lists the rest."
    )


def create_model(
    spec: ModelSpec, pretrained: bool = False, checkpoint: str | Path | None = None
) -> nn.Module:
    """Build `spec` with timm, then load timm weights (`pretrained`) or a local safetensors file.

    Raises:
        SparsekitError: weights cannot be fetched (offline), or the checkpoint does not fit.
    """
    import timm
    from timm.models import model_entrypoint

    from sparsekit.surgery.targets import check_supported

    family = model_entrypoint(spec.name).__module__
    if family not in SUPPORTED_FAMILIES:
        raise SparsekitError(
            f"{spec.name} is not supported: it is built by {family}, and sparsekit finds its "
            "targets in timm's VisionTransformer family (vit_*, deit_*, deit3_*). Pick a model "
            "from `timm.list_models('vit_*')` or `timm.list_models('deit*')`."
        )
    try:
        model = timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:
            raise SparsekitError(
                f"cannot load pretrained weights for {spec.name}: {_first_line(err)}. This machine "
                "may be offline: download the weights elsewhere, save them as safetensors and pass "
                "--checkpoint FILE.safetensors instead of --pretrained."
            ) from None
        raise SparsekitError(
            f"cannot build {spec.name} with {spec.kwargs}: {_first_line(err)}"
        ) from None
    except TypeError as err:
        raise SparsekitError(
            f"{spec.name} does not accept these settings {spec.kwargs}: {_first_line(err)}"
        ) from None
    check_supported(model)
    if checkpoint is not None:
        load_weights(model, Path(checkpoint))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into `model`, refusing files that do not fit it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise SparsekitError(
            f"{path}: --checkpoint takes a .safetensors file (pickled .pt/.pth files can run "
            "code when loaded); convert it with safetensors.torch.save_file(state_dict, path)."
        )
    if not path.is_file():
        raise SparsekitError(f"{path}: no such checkpoint file.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SparsekitError(
            f"{path}: not a readable safetensors file ({_first_line(err)})."
        ) from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise SparsekitError(
            f"{path}: weights do not fit {type(model).__name__} ({detail}). Build the model with "
            "the same --model, --img-size and --patch-size the weights were trained with."
        )
    model.load_state_dict(state)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
