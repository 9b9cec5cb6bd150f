"""How much smaller is a sparse export stored compressed? File sizes side by side, one run.

Builds a timm model (random weights, pretrained=False: sizes depend on how many weights are
kept, not on their values), makes sparsekit's own masks at each sparsity (the recipe's ERK
budgets over the target roles, the largest weights kept, `surgery/masks.py`), and writes the
export twice through `export_model`: `--storage dense` and the default `auto` (kept values plus
a bitmask, sparse_storage.py). It prints model.safetensors' size of each and their ratio, the
time `read_export` takes to load each (expanding included), and the same size ratio for the
weights in float16 (written by the same storage code; exports themselves are float32). Both
exports are loaded back and checked equal.

    python benchmarks/export_size.py                                   # deit_small, 50/70/90%
    python benchmarks/export_size.py --model deit_tiny --roles qkv,proj,fc1,fc2,patch_embed,head
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from sparsekit.export import export_model, read_export
from sparsekit.export.sparse_storage import pack
from sparsekit.models import ModelSpec, create_model, resolve_model_name
from sparsekit.surgery.masks import layer_budgets, topk_mask
from sparsekit.surgery.targets import find_targets


def sparse_masks(model: torch.nn.Module, roles: list[str], sparsity: float, distribution: str):
    """Keep-masks by parameter name: the budgets a recipe gives, the largest weights kept."""
    targets = find_targets(model, roles)
    weights = [t.module.weight for t in targets]
    budgets = layer_budgets([tuple(w.shape) for w in weights], sparsity, distribution)
    return {
        f"{t.name}.weight": topk_mask(w.detach().abs(), k)
        for t, w, k in zip(targets, weights, budgets, strict=True)
    }


def timed_load(path: Path) -> tuple[float, dict[str, torch.Tensor]]:
    start = time.perf_counter()
    _, tensors = read_export(path)
    return time.perf_counter() - start, tensors


def half_size(tensors: dict[str, torch.Tensor], storage: str, path: Path) -> int:
    """Bytes of the tensors in float16, stored as an export stores them."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(pack(half, storage).stored, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--roles", default="qkv,proj,fc1,fc2", help="unstructured_dst's roles")
    parser.add_argument("--distribution", default="erk", choices=["erk", "uniform"])
    args = parser.parse_args()

    spec = ModelSpec(resolve_model_name(args.model), {})
    torch.manual_seed(0)
    model = create_model(spec).eval()
    roles = args.roles.split(",")
    table = Table(title=f"{spec.name}, {args.distribution} over {args.roles}")
    for column in (
        "sparsity",
        "dense MB",
        "auto MB",
        "size ratio",
        "bound 1-s+1/32",
        "load ratio",
        "fp16 ratio",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sparsity in args.sparsity:
            masks = sparse_masks(model, roles, sparsity, args.distribution)
            sizes, loads, loaded = {}, {}, {}
            for storage in ("dense", "auto"):
                out = root / f"{storage}-{sparsity}"
                export_model(spec, model.state_dict(), out, masks, storage=storage)
                sizes[storage] = (out / "model.safetensors").stat().st_size
                loads[storage], loaded[storage] = timed_load(out)
            assert all(torch.equal(loaded["auto"][k], loaded["dense"][k]) for k in loaded["dense"])
            halves = {
                s: half_size(loaded["dense"], s, root / f"{s}.half") for s in ("dense", "auto")
            }
            table.add_row(
                f"{sparsity:.0%}",
                f"{sizes['dense'] / 1e6:.2f}",
                f"{sizes['auto'] / 1e6:.2f}",
                f"{sizes['auto'] / sizes['dense']:.3f}x",
                f"{1 - sparsity + 1 / 32:.3f}x",
                f"{loads['auto'] / loads['dense']:.2f}x",
                f"{halves['auto'] / halves['dense']:.3f}x",
            )
    Console().print(table)
    print(
        "size ratio: auto / dense model.safetensors; the bound is the masked weights' own ratio "
        "(kept share plus one bit per position), which the tensors outside the roles, stored "
        "dense, pull towards 1. load ratio: read_export time, auto / dense (expanding "
        "included). fp16 ratio: the same tensors in float16 (a mask bit is 1/16 of a weight)."
    )


if __name__ == "__main__":
    main()
