"""Which timm models sparsekit supports, and what works on each: the support matrix.

Every name timm registers in the supported families (`models.SUPPORTED_FAMILIES`) is built
small (`small_spec`: 32 px images, 2 blocks, 10 classes, no pretrained weights) and each kind of
sparsity is tried on it by compiling a one-phase recipe: it works, or sparsekit refuses it with
its own one-paragraph reason. `end_to_end` then trains the kinds that work together for a few
steps, exports the model compacted, loads it back and compares it with the masked model on
real photos. `python -m sparsekit.support --write docs/support.md` writes the matrix the docs
show; `tests/test_support_matrix.py` checks every name against it.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsekit.errors import RecipeError, SparsekitError
from sparsekit.models import SUPPORTED_FAMILIES, ModelSpec

KINDS = ("unstructured", "heads", "neurons", "tokens")
SMALL = {"img_size": 32, "depth": 2, "num_classes": 10}
HEAD_WIDTH = 16
STEPS = 2  # training steps of the end-to-end check: the first prunes and grows, both train
TOLERANCE = 1e-4  # compacted vs masked, relative to the largest output
_CADENCE = {"update_every": "1 steps", "min_update_interval": "1 steps"}  # prune-grow each step
_PHASES = {
    "unstructured": {"kind": "unstructured_dst", "sparsity": 0.5, **_CADENCE},
    "heads": {"kind": "head_prune_grow", "head_density": 0.5, **_CADENCE},
    "neurons": {"kind": "head_prune_grow", "head_density": 0.5, "mlp_density": 0.5, **_CADENCE},
    "tokens": {"kind": "token_select", "keep_ratio": 0.5},
}


@dataclass(frozen=True)
class Support:
    """What works on one timm model: each kind of sparsity, or sparsekit's reason why not."""

    name: str
    family: str
    spec: ModelSpec  # the small size it was tried at (`small_spec`)
    refused: dict[str, str] = field(default_factory=dict)  # kind -> reason; absent: works

    def works(self, kind: str) -> bool:
        return kind not in self.refused


def family_names() -> list[str]:
    """Every timm model name of the supported families, sorted."""
    import timm
    from timm.models import model_entrypoint

    return sorted(
        n for n in timm.list_models() if model_entrypoint(n).__module__ in SUPPORTED_FAMILIES
    )


def small_spec(name: str) -> ModelSpec:
    """`name` at the matrix's small size: `SMALL` (the image a whole number of patches), and
    `HEAD_WIDTH` features per head with
    the model's own number of heads (which rows and columns make a head depends on the layout,
    not on the width; a 7-billion-parameter model would not fit a test otherwise). A model that
    lists a value per block (Sapiens2's key/value heads) keeps its first and its middle
    block's; one whose width cannot change keeps its own."""
    import timm

    from sparsekit.surgery.geometry import patch_embedding

    kwargs = dict(SMALL)
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False)
    patch = patch_embedding(full).patch_size[0]
    if patch > 1 and (SMALL["img_size"] % patch or SMALL["img_size"] < 2 * patch):
        kwargs["img_size"] = patch * max(2, SMALL["img_size"] // patch)  # 28 px for 14 px
    first = full.blocks[0]
    attn = getattr(first, "attn", None) or getattr(first, "attns", [None])[0]
    kv = [getattr(getattr(b, "attn", None), "num_kv_heads", None) for b in full.blocks]
    if kv[0] is not None and (len(set(kv)) > 1 or not _builds(name, kwargs)):
        kwargs["num_kv_heads"] = [kv[0], kv[len(kv) // 2]]
    heads = getattr(attn, "num_heads", None) or getattr(first, "num_heads", None)
    if heads and _builds(name, {**kwargs, "embed_dim": heads * HEAD_WIDTH}):
        kwargs["embed_dim"] = heads * HEAD_WIDTH
    return ModelSpec(name, kwargs)


def _builds(name: str, kwargs: dict) -> bool:
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - any refusal: these arguments do not build it
        return False
    return True


def support_of(name: str) -> Support:
    """Try each kind of sparsity on `name` at the small size (a one-phase recipe compiled for
    the model); a refusal is kept as sparsekit's message."""
    from timm.models import model_entrypoint

    from sparsekit.models import create_model

    spec = small_spec(name)
    family = model_entrypoint(name).__module__.rsplit(".", 1)[1]
    try:
        model = create_model(spec)
    except SparsekitError as err:
        return Support(name, family, spec, dict.fromkeys(KINDS, str(err)))
    refused = {}
    for kind in KINDS:
        try:
            _compiled(model, [kind]).close()
        except (SparsekitError, RecipeError) as err:
            refused[kind] = _reason(str(err))
    if "heads" in refused and "neurons" in refused and refused["neurons"] == refused["heads"]:
        refused["neurons"] = "head_prune_grow removes heads first: see the heads column."
    return Support(name, family, spec, refused)


def end_to_end(support: Support, photos: torch.Tensor) -> tuple[float, nn.Module]:
    """Train every kind that works on the model together for `STEPS` steps, export it
    compacted and load it back; return the largest difference between the loaded model's
    and the masked model's outputs on `photos` (resized to the model's input), relative to
    the largest output, and the loaded model. Every weight starts random, so no slice of a
    zero tensor goes unchecked.

    Raises:
        SparsekitError: nothing works on the model, or a step of the pipeline refuses it.
    """
    from sparsekit.export import export_model, load_compact
    from sparsekit.models import create_model

    kinds = [k for k in KINDS if support.works(k)]
    if "neurons" in kinds:
        kinds.remove("heads")
    if not kinds:
        raise SparsekitError(f"{support.name}: no kind of sparsity works on it.")
    spec = support.spec
    size = spec.kwargs["img_size"]
    photos = nn.functional.interpolate(photos, size=(size, size), mode="bilinear")
    torch.manual_seed(0)
    model = create_model(spec)
    with torch.no_grad():  # timm starts biases, position tables and layer scales at 0 or 1e-5,
        for p in model.parameters():  # which would hide a slicing mistake
            p.normal_(0, 0.2)
    session = _compiled(model, kinds, train=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(4, 3, size, size, generator=generator)
        y = torch.randint(0, 10, (4,), generator=generator)
        session.batch_start()
        nn.functional.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        session.optimizer.step()
        session.optimizer.zero_grad()
        session.after_optimizer_step()
    model.eval()
    pruned = {
        "unstructured": any(not m.all() for m in session.masks().values()),
        "heads": any(not k.all() for n, k in session.unit_masks().items() if n.endswith("attn")),
        "neurons": any(not k.all() for n, k in session.unit_masks().items() if n.endswith("mlp")),
        "tokens": bool(session.token_placements()),
    }
    if not all(pruned[k] for k in kinds):
        raise SparsekitError(f"{support.name}: {kinds} were compiled but not all of them pruned.")
    with torch.no_grad():
        expected = model(photos)
    with tempfile.TemporaryDirectory() as folder:
        export_model(
            spec,
            model.state_dict(),
            Path(folder) / "export",
            session.masks(),
            session.unit_masks(),
            session.token_placements(),
            compact=True,
        )
        loaded = load_compact(Path(folder) / "export")
    with torch.no_grad():
        got = loaded(photos)
    if not expected.isfinite().all() or expected.std() == 0:
        raise SparsekitError(f"{support.name}: the masked model's outputs are not informative.")
    return float((got - expected).abs().max() / expected.abs().max()), loaded


def sample_photos() -> torch.Tensor:
    """scikit-learn's two bundled photos, resized to 64 px and normalised as ImageNet's."""
    from sklearn.datasets import load_sample_images

    images = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2) / 255
    images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


def _compiled(model: nn.Module, kinds: list[str], train: bool = False):
    """A session of `model` under a recipe with one phase per kind (heads and neurons share
    their phase), its optimizer built after the phases added their parameters."""
    from sparsekit import Session, compile_recipe, load_recipe
    from sparsekit.timeline import Timeline

    recipe = load_recipe(
        {
            "name": "support",
            "training": {"epochs": 1, "batch_size": 4, "schedule": {"warmup": 0}},
            "phases": [_PHASES[kind] for kind in kinds],
        }
    )
    timeline = Timeline(1, STEPS)
    modifiers = compile_recipe(recipe, model, timeline)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if train else None
    return Session(model, optimizer, modifiers, timeline)


def _reason(message: str) -> str:
    """A refusal without the recipe's phase prefix ("phases[0] (head_prune_grow): ")."""
    head, sep, rest = message.partition("): ")
    return rest if sep and head.startswith("phases[") else message


def matrix_markdown(rows: list[Support]) -> str:
    """The support matrix as the docs page shows it: one table row per name, then each
    distinct refusal once, numbered."""
    reasons: dict[str, int] = {}
    works = {kind: sum(row.works(kind) for row in rows) for kind in KINDS}
    lines = [
        f"Of the {len(rows)} names, unstructured sparsity works on {works['unstructured']}, head "
        f"pruning on {works['heads']}, neuron pruning on {works['neurons']} and token selection "
        f"on {works['tokens']}.",
        "",
        "| model | family | unstructured | heads | neurons | tokens |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for kind in KINDS:
            if row.works(kind):
                cells.append("yes")
            else:
                number = reasons.setdefault(row.refused[kind], len(reasons) + 1)
                cells.append(f"no [{number}](#why-{number})")
        lines.append(f"| `{row.name}` | {row.family} | {' | '.join(cells)} |")
    lines += ["", "## Why not", ""]
    for reason, number in reasons.items():
        lines.append(f'<a id="why-{number}"></a>**{number}.** {reason}')
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="the docs page to write the matrix into")
    args = parser.parse_args(argv)
    rows = [support_of(name) for name in family_names()]
    table = matrix_markdown(rows)
    if args.write is None:
        print(table)
        return
    page = args.write.read_text()
    start, end = page.index(MATRIX_START), page.index(MATRIX_END)
    args.write.write_text(page[: start + len(MATRIX_START)] + "\n" + table + "\n" + page[end:])


MATRIX_START = "<!-- support matrix: python -m sparsekit.support --write docs/support.md -->"
MATRIX_END = "<!-- end of support matrix -->"


if __name__ == "__main__":
    main()
