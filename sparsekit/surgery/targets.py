"""Find the weights a phase acts on, by role, in a timm Vision Transformer.

Roles name what a weight does (`qkv`, `proj`, `fc1`, `fc2`, `patch_embed`, `head`) so a recipe
works on every model of the family without listing parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from sparsekit.errors import RecipeError, SparsekitError

# Where each role lives inside a block (or the model), in the attribute names timm uses. Parallel
# blocks hold their branches in `attns.*` and `ffns.*` (ParallelThingsBlock), or fuse q, k, v and
# the MLP's first layer into one `in_proj` (ParallelScalingBlock), which plays the qkv role.
_BLOCK_ROLES: dict[str, tuple[str, ...]] = {
    "qkv": (
        *("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.q_proj", "attn.k_proj", "attn.v_proj"),
        *("attns.*.attn.qkv", "in_proj"),
    ),
    "proj": ("attn.proj", "attns.*.attn.proj", "attn_out_proj", "out_proj"),
    "fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x", "ffns.*.mlp.fc1"),
    "fc2": ("mlp.fc2", "ffns.*.mlp.fc2", "mlp_out_proj"),
}
# Blocks that run their attention and MLP side by side instead of holding one `attn` and `mlp`.
PARALLEL_BLOCKS = ("ParallelThingsBlock", "ParallelScalingBlock", "DiffParallelScalingBlock")
_MODEL_ROLES: dict[str, tuple[str, ...]] = {
    "patch_embed": ("patch_embed.proj", "embeds.proj"),
    "head": ("head", "head_dist"),
}


@dataclass(frozen=True)
class Target:
    """One weight a phase acts on."""

    name: str  # module name, e.g. "blocks.3.attn.qkv"
    role: str
    module: nn.Module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight


def model_classes() -> tuple[type, ...]:
    """The timm model classes sparsekit knows the layout of (`models.SUPPORTED_FAMILIES`)."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return (VisionTransformer, Eva, Beit, VisionTransformerRelPos, NaFlexVit)


def check_supported(model: nn.Module) -> None:
    """Refuse architectures whose layout sparsekit does not know, before touching them."""
    classes = model_classes()
    for attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, attr, None), classes):
            raise SparsekitError(
                f"got a wrapped model ({type(model).__name__}); give sparsekit the model inside "
                f"it (`model.{attr}`): modifiers change the module's own weights, and the wrapper "
                "sees their changes."
            )
    if not isinstance(model, classes):
        raise SparsekitError(
            f"{type(model).__name__} is not supported: sparsekit finds its targets in timm's "
            f"plain ViTs ({', '.join(c.__name__ for c in classes)}); hierarchical ViTs (Swin, "
            "MViT, LeViT, MaxViT) are out of scope. docs/support.md lists every supported name."
        )
    for i, block in enumerate(model.blocks):
        plain = hasattr(block, "attn") and hasattr(block, "mlp")
        if not plain and parallel_kind(block) is None:
            raise SparsekitError(
                f"block {i} of {type(model).__name__} is a {type(block).__name__}, which holds "
                "no `attn` and `mlp` and is not one of timm's parallel blocks "
                f"({', '.join(PARALLEL_BLOCKS)}); its layout is unknown to sparsekit. "
                "docs/support.md lists the models that are supported."
            )


def parallel_kind(block: nn.Module) -> str | None:
    """Which of timm's parallel blocks `block` is (compacted, it is a subclass), or None."""
    return next((c.__name__ for c in type(block).__mro__ if c.__name__ in PARALLEL_BLOCKS), None)


def find_targets(
    model: nn.Module,
    roles: list[str],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[Target]:
    """Modules with a weight for each role, filtered by glob patterns over module names.

    Raises:
        SparsekitError: the architecture is unsupported, or nothing matches.
    """
    check_supported(model)
    modules = dict(model.named_modules())
    found: list[Target] = []
    for role in roles:
        if role in _BLOCK_ROLES:
            paths = [
                f"blocks.{i}.{name}"
                for i, block in enumerate(model.blocks)
                for name, _ in block.named_modules()
                if any(fnmatchcase(name, suffix) for suffix in _BLOCK_ROLES[role])
            ]
        else:
            paths = list(_MODEL_ROLES[role])
        for path in paths:
            module = modules.get(path)
            if module is not None and isinstance(getattr(module, "weight", None), nn.Parameter):
                found.append(Target(path, role, module))
    if include:
        found = [t for t in found if any(fnmatchcase(t.name, p) for p in include)]
    if exclude:
        found = [t for t in found if not any(fnmatchcase(t.name, p) for p in exclude)]
    if not found:
        raise RecipeError(
            f"no weights of {type(model).__name__} match roles {roles} with include={include or []} "
            f"and exclude={exclude or []}. Module names look like 'blocks.0.attn.qkv' or "
            "'blocks.11.mlp.fc2'; loosen the patterns."
        )
    order = {name: i for i, name in enumerate(modules)}
    found.sort(key=lambda t: order[t.name])
    return found
