"""N:M layers of an export: marked when written (only where the weights really hold the
pattern), and on load converted to semi-structured sparse tensors
(`torch.sparse.to_sparse_semi_structured`), which NVIDIA GPUs of compute capability 8.0 and
newer multiply on their sparse tensor cores.

Semi-structured sparsity is 2:4 in float16 and bfloat16: at most 2 non-zero weights in every
4 consecutive input weights of a row. A layer marked with another pattern qualifies when its
weights happen to hold 2:4 as well (1:4 does, 2:8 in general does not); the check is on the
tensors, never on the mark alone, because the conversion silently drops any third non-zero.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.nm_masks import holds_nm

if TYPE_CHECKING:
    from sparsekit.recipe import Recipe

SEMI_STRUCTURED = (2, 4)  # what the sparse tensor cores run
ACCELERATED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_CAPABILITY = (8, 0)  # Ampere: A100, RTX 30xx; Hopper and later too
_PATTERN = re.compile(r"^([0-9]{1,3}):([0-9]{1,3})$")
_FALLBACK_SHAPE = (32, 64)  # the strictest fp16 constraint of torch's two backends


def parse_nm(text: str) -> tuple[int, int]:
    """Parse "2:4" into (2, 4).

    Raises:
        SparsekitError: not N:M with 0 < N < M.
    """
    match = _PATTERN.match(text)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise SparsekitError(
            f"{text[:40]!r} is not an N:M pattern; write N:M with 0 < N < M, e.g. '2:4'."
        )
    return int(match[1]), int(match[2])


def recipe_patterns(recipe: Recipe) -> list[str]:
    """The N:M patterns a recipe's phases train with (their `pattern` field), for the marks."""
    return sorted({p for phase in recipe.phases if (p := getattr(phase, "pattern", None))})


def nm_marks(
    model: nn.Module, masks: dict[str, torch.Tensor], patterns: Iterable[str]
) -> dict[str, str]:
    """The export's mark: each masked Linear layer of `model` (the baked model, compacted or
    not) whose keep-mask holds exactly N of every M and whose weights at most N, by module
    name. Of several patterns, the first that holds in order of M then N (a 2:4 layer also
    holds 4:8: it is marked 2:4). A layer whose compaction broke its groups (MLP neurons
    sliced out of fc2's inputs) is not marked."""
    candidates = sorted({parse_nm(p) for p in patterns}, key=lambda nm: (nm[1], nm[0]))
    if not candidates:
        return {}
    modules = dict(model.named_modules())
    marks: dict[str, str] = {}
    for name, mask in masks.items():
        module = modules.get(name.removesuffix(".weight"))
        if not name.endswith(".weight") or not isinstance(module, nn.Linear):
            continue
        for n, m in candidates:
            if holds_nm(mask, n, m, exact=True) and holds_nm(module.weight, n, m):
                marks[name.removesuffix(".weight")] = f"{n}:{m}"
                break
    return dict(sorted(marks.items()))


@dataclass
class Plan:
    """Which marked layers convert, and why the others stay dense."""

    convert: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # layer -> reason


def _backend() -> Any:
    """The semi-structured tensor class the conversion uses: cuSPARSELt when torch has it
    (what `to_sparse_semi_structured` picks), CUTLASS otherwise."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not (
        cusparselt is not None and cusparselt.is_available()
    ):
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def _min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) the weight must be a multiple of, for the backend in use."""
    constraints = getattr(_backend(), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraints is None:
        return _FALLBACK_SHAPE
    return int(constraints.sparse_min_rows), int(constraints.sparse_min_cols)


def semi_structured_plan(model: nn.Module, nm_layers: dict[str, str], where: str) -> Plan:
    """Check every marked layer of `model` (already in its final dtype) against what
    semi-structured sparsity needs: a Linear, float16 or bfloat16, at most 2 non-zero of
    every 4 input weights, and a shape that is a multiple of the backend's block. Needs no GPU.

    Raises:
        SparsekitError: a mark that names no Linear layer of the model (the file is
            inconsistent).
    """
    plan = Plan()
    modules = dict(model.named_modules())
    for name, pattern in sorted(nm_layers.items()):
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise SparsekitError(
                f"{where}: its manifest marks {name!r} as {pattern} sparse, but the model has "
                "no Linear layer of that name; the file is inconsistent. Export it again."
            )
        weight = module.weight
        rows, cols = weight.shape
        min_rows, min_cols = _min_shape(weight.dtype)
        if weight.dtype not in ACCELERATED_DTYPES.values():
            plan.dense[name] = f"its weights are {weight.dtype}, not float16 or bfloat16"
        elif not holds_nm(weight, *SEMI_STRUCTURED):
            plan.dense[name] = f"it holds {pattern}, not 2:4 (at most 2 of every 4 non-zero)"
        elif rows % min_rows or cols % min_cols:
            plan.dense[name] = (
                f"its shape {rows}x{cols} is not a multiple of the {min_rows}x{min_cols} "
                "blocks semi-structured sparse tensors are made of"
            )
        else:
            plan.convert.append(name)
    return plan


def check_device(device: torch.device | str | None = None) -> torch.device:
    """The CUDA device to accelerate on, if it has sparse tensor cores.

    Raises:
        SparsekitError: no CUDA, or a GPU older than compute capability 8.0.
    """
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise SparsekitError(
            "accelerate converts an export's 2:4 layers to semi-structured sparse tensors, "
            "which run only on NVIDIA GPUs of compute capability 8.0 or newer (A100, RTX 30xx, "
            f"H100 and later); this machine has no usable CUDA device (torch {torch.__version__}, "
            f"{build}). Load the export without accelerate: it runs dense, zeros included, "
            "on any device, with the same results."
        )
    device = torch.device(device if device is not None else "cuda")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise SparsekitError(
            f"accelerate needs sparse tensor cores (compute capability 8.0 or newer: A100, "
            f"RTX 30xx, H100 and later), but {torch.cuda.get_device_name(device)} is "
            f"{capability[0]}.{capability[1]}. Load the export without accelerate: it runs "
            "dense, with the same results."
        )
    return device


def accelerate_(model: nn.Module, nm_layers: dict[str, str], where: str) -> list[str]:
    """Convert the marked layers of `model` (on a CUDA device, in float16 or bfloat16) that
    qualify (`semi_structured_plan`) in place, each weight a frozen semi-structured sparse
    tensor; warn about marked layers left dense. Returns the converted layers' names.

    Raises:
        SparsekitError: nothing marked, no qualifying layer, a model not on CUDA or not in
            float16 or bfloat16, or a GPU without sparse tensor cores.
    """
    if not nm_layers:
        raise SparsekitError(
            f"{where} marks no N:M-sparse layers, so there is nothing to accelerate. Train with "
            'an unstructured_dst phase whose pattern is "2:4" and export that run; or load '
            "this export without accelerate."
        )
    weight = next(model.parameters())
    check_device(weight.device if weight.is_cuda else None)
    if not weight.is_cuda or weight.dtype not in ACCELERATED_DTYPES.values():
        raise SparsekitError(
            f"accelerate needs the model on a CUDA device in float16 or bfloat16, but it is on "
            f"{weight.device} in {weight.dtype}; move it first (model.to('cuda', "
            "torch.float16)), or let load_compact(path, accelerate=True) do it."
        )
    plan = semi_structured_plan(model, nm_layers, where)
    if not plan.convert:
        name, reason = next(iter(plan.dense.items()))
        raise SparsekitError(
            f"{where}: none of its {len(nm_layers)} N:M-marked layers can be made "
            f"semi-structured sparse: {name} stays dense because {reason}. Semi-structured "
            'sparse tensors are 2:4 in float16 or bfloat16; train with pattern "2:4" to '
            "accelerate, or load without accelerate."
        )
    if plan.dense:
        listed = "; ".join(f"{name}: {reason}" for name, reason in list(plan.dense.items())[:3])
        warnings.warn(
            f"{where}: {len(plan.dense)} N:M-marked layers stay dense ({listed})",
            stacklevel=2,
        )
    backend = _backend()
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    with torch.no_grad():
        for name in plan.convert:
            module = model.get_submodule(name)
            dense = module.weight.detach().contiguous()
            sparse = (
                SparseSemiStructuredTensorCUTLASS.from_dense(dense)
                if backend is SparseSemiStructuredTensorCUTLASS
                else to_sparse_semi_structured(dense)
            )
            module.weight = nn.Parameter(sparse, requires_grad=False)
    return plan.convert


def accelerated(
    model: nn.Module, nm_layers: dict[str, str], where: str, accelerate: bool | str
) -> nn.Module:
    """`model` on CUDA in the dtype `accelerate` names (True: float16; "float16",
    "bfloat16"), its qualifying N:M layers converted: what `load_compact(..., accelerate=)`
    returns.

    Raises:
        SparsekitError: an unknown dtype name, nothing marked, no CUDA or no sparse tensor
            cores, no qualifying layer (see `accelerate_`).
    """
    name = "float16" if accelerate is True else accelerate
    if name not in ACCELERATED_DTYPES:
        raise SparsekitError(
            f"accelerate={accelerate!r}: give True (float16), 'float16' or 'bfloat16'; "
            "semi-structured sparse tensors run in half precision."
        )
    if not nm_layers:
        accelerate_(model, nm_layers, where)  # refuses, saying why
    device = check_device()
    model = model.to(device, ACCELERATED_DTYPES[name])
    accelerate_(model, nm_layers, where)
    return model
