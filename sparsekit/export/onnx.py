"""ONNX export: the compacted model (pruned heads and neurons removed, token selectors in front
of their blocks) as an ONNX graph with a dynamic batch size, for runtimes other than PyTorch.

The graph comes from `torch.onnx.export` with its default exporter (`dynamo=True`: `torch.export`
then onnxscript's torchlib) at opset 18, the opset torchlib is written in, so no version
conversion runs. Token selection's eval path (`TokenSelection._select_gathered`) is traced as it
runs: ONNX `TopK` over the scorer's output, then `GatherElements` of the kept tokens. Before the
file is moved into place it is run in ONNX Runtime (CPU) at two batch sizes and compared with
the PyTorch model: a graph that computes something else is refused, not written.

`export_onnx` writes one model to one file (what `sparsekit bench` times); `export_run_onnx` and
`convert_export` write a run or an existing export into a folder of their own, `OUT/model.onnx`,
with the same locking and refusal of foreign folders as the safetensors export.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit.atomic import default_file_mode, remove_torn
from sparsekit.errors import SparsekitError, UsageError
from sparsekit.exclusive import locked_folder, refuse_unless_ours
from sparsekit.surgery.geometry import input_size as model_input_size
from sparsekit.version import __version__

OPSET = 18
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
METADATA_KEY = "sparsekit"  # metadata_props key of the record below
ONNX_FILE = "model.onnx"
ONNX_FILES = (ONNX_FILE, f"{ONNX_FILE}.data")  # the data file only above protobuf's 2 GB
VERIFY_BATCHES = (1, 2)  # batch 1 is the one torch.export would otherwise specialise on
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL = "pip install 'sparsekit[onnx]' (or the dev extra)"
MIN_TORCH = "2.6"  # dynamo=True with dynamic_shapes and onnxscript's torchlib at opset 18


@dataclass(frozen=True)
class OnnxExport:
    """What an ONNX export wrote and how it was checked."""

    path: Path
    input_shape: tuple[str | int, ...]  # ("batch", C, H, W)
    heads: list[int]  # kept per block
    mlp_hidden: list[int]
    token_selection: list[tuple[int, float]]  # (before_block, keep_ratio)
    max_rel_diff: float  # ONNX Runtime against PyTorch, worst of the checked batches


def require_onnx() -> None:
    """Refuse, naming the extra to install, when onnx, onnxscript or onnxruntime is missing
    (torch's exporter needs the first two; the check before writing needs the third).

    Raises:
        SparsekitError: a missing package.
    """
    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SparsekitError(
            f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            f" not installed; {INSTALL}, then run the command again. Nothing was written."
        )
    if torch.__version__ < MIN_TORCH:  # TorchVersion compares with strings
        raise SparsekitError(
            f"ONNX export uses torch.onnx.export's dynamo exporter, which needs PyTorch "
            f"{MIN_TORCH} or later; this is {torch.__version__}. Upgrade torch (pip install -U "
            "torch), then run the command again. Nothing was written."
        )


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (eval mode, as it is: compact it first) to the ONNX file `path`, with a
    dynamic batch size, and return `path`.

    The file is written beside `path`, checked in ONNX Runtime against the model, and renamed
    into place: an existing file is replaced only when it is a sparsekit ONNX export, and a
    failure leaves nothing behind. The model's training mode is restored afterwards. Above
    protobuf's 2 GB the weights go to `path` + ".data" beside it (ONNX external data).

    Args:
        model: a timm VisionTransformer (token selectors and all), on any device.
        path: the `.onnx` file to write.
        input_size: (channels, height, width); default, the model's own (`geometry.input_size`).
        metadata: extra JSON-able fields for the `sparsekit` record in the file's
            metadata_props (model name, source export, ...).

    Raises:
        SparsekitError: onnx, onnxscript or onnxruntime missing; a model the exporter cannot
            convert (an operator ONNX has no function for); a graph whose results differ from
            the model's; a path that is another tool's file or cannot be written.
    """
    _export(model, Path(path), input_size, metadata)
    return Path(path)


@torch.no_grad()
def _export(
    model: nn.Module,
    path: Path,
    input_size: tuple[int, int, int] | None,
    metadata: dict[str, Any] | None,
) -> tuple[float, list[str]]:
    """`export_onnx`; returns the worst relative difference against PyTorch and the names of
    the files written."""
    require_onnx()
    if path.is_dir():
        raise SparsekitError(f"{path} is a folder; give export_onnx the .onnx file to write.")
    if path.exists() and not is_sparsekit_onnx(path):
        raise SparsekitError(
            f"{path} exists and is not an ONNX file sparsekit wrote; it was not touched. Give "
            "another path, or remove it yourself."
        )
    size = input_size or model_input_size(model)
    training = model.training
    model.eval()
    try:
        program = _program(model, size)
        _constant_sort_k(program.model)
        record = {
            "sparsekit_version": __version__,
            "opset": OPSET,
            "input": {"name": INPUT_NAME, "shape": ["batch", *size]},
            "output": OUTPUT_NAME,
            "preprocessing": _preprocessing(model),
            **(metadata or {}),
        }
        program.model.metadata_props[METADATA_KEY] = json.dumps(record, sort_keys=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_torn(path)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        except OSError as err:
            raise _cannot(path, err) from None
        try:
            program.save(tmp / path.name)
            diff = _check_against(model, tmp / path.name, size)
            written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # graph last
            for file in written:
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(file, default_file_mode())
            for file in written:
                os.replace(file, path.parent / file.name)
        except OSError as err:
            raise _cannot(path, err) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.train(training)
    return diff, [file.name for file in written]


def _cannot(path: Path, err: OSError) -> SparsekitError:
    return SparsekitError(
        f"cannot write the ONNX export {path} ({err.strerror or err}); what was there is "
        "untouched. Give a path you can write, or free disk space."
    )


def _program(model: nn.Module, size: tuple[int, int, int]):
    """The ONNX program of `model`, or the exporter's refusal as one paragraph."""
    param = next(model.parameters())
    example = torch.randn(2, *size, device=param.device, dtype=param.dtype)
    try:
        with _quiet():
            return torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                verbose=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
    except torch.onnx.OnnxExporterError as err:
        raise SparsekitError(
            f"torch.onnx.export cannot convert this {type(model).__name__} to ONNX opset "
            f"{OPSET}: {_reason(err)}. The model holds an operation ONNX (or torch's exporter) "
            "has no translation for; sparsekit exports timm VisionTransformer models with "
            "their own layers. Nothing was written."
        ) from None


def _constant_sort_k(model: Any) -> None:
    """Give every full sort's TopK a constant k. PyTorch's `sort` (which puts the selected
    token indices back in image order) becomes ONNX `TopK` with k = Shape(x)[axis], computed at
    run time; the axis is static (a selector keeps a fixed count), and TensorRT reads TopK only
    with k an initializer. `k` here is exactly that dimension, so nothing else changes."""
    import numpy as np
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    changed = False
    for node in list(model.graph):
        if node.op_type != "TopK" or node.inputs[1].const_value is not None:
            continue
        x, k = node.inputs
        axis = node.attributes["axis"].value
        dim = x.shape[axis] if x.shape is not None else None
        if isinstance(dim, int) and _is_dim_of(k, x, axis):
            value = ir.Value(
                name=f"{node.name}_k", const_value=ir.tensor(np.array([dim], dtype=np.int64))
            )
            model.graph.register_initializer(value)
            node.replace_input_with(1, value)
            changed = True
    if changed:
        RemoveUnusedNodesPass()(model)


def _is_dim_of(k: Any, x: Any, axis: int) -> bool:
    """Whether `k` is Reshape(Gather(Shape(x), axis)): the size of `x` along `axis`."""
    reshape = k.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return False
    gather = reshape.inputs[0].producer()
    if gather is None or gather.op_type != "Gather":
        return False
    gather_axis = gather.attributes.get("axis")
    if gather_axis is not None and gather_axis.value != 0:
        return False
    index = gather.inputs[1].const_value
    shape = gather.inputs[0].producer()
    if index is None or shape is None or shape.op_type != "Shape" or shape.inputs[0] is not x:
        return False
    rank = len(x.shape)
    starts = shape.attributes.get("start")
    if (starts is not None and starts.value != 0) or "end" in shape.attributes:
        return False
    return int(index.numpy().reshape(-1)[0]) % rank == axis % rank


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and deprecation notes, kept off the user's terminal."""
    import io
    import warnings

    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _reason(err: BaseException) -> str:
    """The innermost cause's first line (the exporter wraps it in pages of advice)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:400].rstrip(".")


def _preprocessing(model: nn.Module) -> dict[str, Any]:
    """timm's normalisation and resizing of the model's pretrained config (its input size is
    the architecture's default, so the input shape above is what counts)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in keys}


def _check_against(model: nn.Module, file: Path, size: tuple[int, int, int]) -> float:
    """Run `file` in ONNX Runtime's CPU provider at each of VERIFY_BATCHES and compare with the
    model; return the worst relative difference (max |a - b| / max |b|).

    Raises:
        SparsekitError: a difference above VERIFY_TOLERANCE, or a graph ONNX Runtime rejects.
    """
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise SparsekitError(
            f"ONNX Runtime cannot load the graph torch.onnx.export made ({_reason(err)}); "
            "nothing was written. This is a bug in the exporter or in sparsekit: please report "
            "it with the model name and arguments."
        ) from None
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in VERIFY_BATCHES:
        x = torch.randn(batch, *size, generator=generator)
        expected = model(x.to(param.device, param.dtype)).float().cpu()
        got = torch.from_numpy(
            session.run(None, {INPUT_NAME: x.to(param.dtype).numpy()})[0]
        ).float()
        worst = max(worst, relative_difference(got, expected))
    tolerance = VERIFY_TOLERANCE.get(param.dtype, 1e-3)
    if not worst <= tolerance:
        raise SparsekitError(
            f"the ONNX graph of this model computes other results than PyTorch (relative "
            f"difference {worst:.2e}, above {tolerance:g}, at batch sizes "
            f"{', '.join(map(str, VERIFY_BATCHES))}), so it was not written. This is a bug in "
            "the exporter or in sparsekit: please report it with the model name and arguments."
        )
    return worst


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: one scale for the whole output, so logits near
    zero do not blow the ratio up."""
    scale = float(expected.abs().max())
    diff = float((got - expected).abs().max())
    return diff / scale if scale > 0 else diff


def is_sparsekit_onnx(file: Path) -> bool:
    """Whether `file` is an ONNX model whose metadata carries sparsekit's record."""
    try:
        import onnx

        proto = onnx.load(str(file), load_external_data=False)
    except Exception:  # not ONNX, unreadable, or onnx missing: not ours to replace
        return False
    return any(p.key == METADATA_KEY for p in proto.metadata_props)


def is_onnx_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier sparsekit ONNX export and nothing else."""
    names = {p.name for p in folder.iterdir()}
    return names <= set(ONNX_FILES) and ONNX_FILE in names and is_sparsekit_onnx(folder / ONNX_FILE)


# --- from a run folder or an existing export ----------------------------------------------


def export_run_onnx(
    run_dir: str | Path, out: str | Path, best: bool = False, ema: bool = False
) -> OnnxExport:
    """The last (or `best`) checkpoint of a run, with `ema` its moving average, baked and
    compacted as `sparsekit export` does it, written as `out/model.onnx`."""
    from sparsekit.export.baked import baked_model
    from sparsekit.run_folder.trained_run import open_run

    require_onnx()
    run = open_run(Path(run_dir), best=best, ema=ema)
    model = baked_model(run.spec, run.weights, run.masks, run.unit_masks, run.placements)
    source = {"run": str(run_dir), "best": best, "ema": ema}
    return _write_folder(model, Path(out), run.spec.name, run.spec.kwargs, source)


def convert_export(export: str | Path, out: str | Path) -> OnnxExport:
    """An existing sparsekit export (its folder or model.safetensors), read with every check of
    `load_compact` (hash, format, bounds), written as `out/model.onnx`. A masked export is
    compacted first: its heads and neurons whose every weight is zero compute nothing and are
    removed, as `--compact` would have."""
    from sparsekit.export.loader import built_export, read_export

    require_onnx()
    manifest, tensors = read_export(export)
    model = built_export(export, manifest, tensors)
    if not manifest.compact:
        model = _compacted(model)
    source = {"export": str(export), "export_sha256": manifest.sha256}
    return _write_folder(model, Path(out), manifest.model, manifest.model_kwargs, source)


def _compacted(model: nn.Module) -> nn.Module:
    """A full-size model whose dropped units are all zero (a masked export), compacted."""
    from sparsekit.surgery.compact import compact_
    from sparsekit.surgery.expand import zeroed_units
    from sparsekit.surgery.layouts import gateable_groups

    return compact_(model, zeroed_units(gateable_groups(model))).eval()


def default_output(source: Path, is_run: bool) -> Path:
    """RUN_DIR/export-onnx for a run; for an export folder E, E-onnx beside it (inside E it
    would make E something other than an export, which a later export into E refuses)."""
    if is_run:
        return source / "export-onnx"
    folder = source.parent if source.suffix == ".safetensors" else source
    return folder.with_name(f"{folder.name}-onnx")


def refuse_with_format(compact: bool, best: bool, ema: bool, is_run: bool) -> None:
    """Options that mean nothing for an ONNX export, refused before anything is read.

    Raises:
        UsageError: --masked, or --best/--ema with an export as input.
    """
    if not compact:
        raise UsageError(
            "--format onnx writes the compacted model (pruned heads and neurons removed: an "
            "ONNX runtime would compute a masked model's zeros like any other weight); leave "
            "out --masked."
        )
    if not is_run and (best or ema):
        raise UsageError(
            f"{'--best' if best else '--ema'} chooses a run's checkpoint; an export holds one "
            "model already. Give the run folder instead, or leave the option out."
        )


def _write_folder(
    model: nn.Module, out: Path, name: str, kwargs: dict[str, Any], source: dict[str, Any]
) -> OnnxExport:
    refuse_unless_ours(
        out,
        is_onnx_export,
        is_file=f"{out} is a file; give -o a folder for the ONNX export.",
        not_ours=f"{out} holds files that are not an earlier sparsekit ONNX export (only "
        f"{ONNX_FILE} written by sparsekit is replaced); nothing in it was touched. Give -o a "
        "new or empty folder.",
    )
    busy = (
        f"{out} is in use: another sparsekit process is exporting into it now. Wait for it to "
        "finish, or give -o another folder."
    )

    def cannot(reason: str) -> str:
        return (
            f"cannot write the ONNX export to {out} ({reason}); an earlier export there is "
            "untouched. Give -o a folder you can write, or free disk space."
        )

    from sparsekit.surgery.tokens import selection_of

    selection = selection_of(model)
    selectors = [(p.before_block, p.keep_ratio) for p in selection.placements] if selection else []
    from sparsekit.surgery.layouts import block_shape

    shapes = [block_shape(b) for b in model.blocks]
    heads, hidden = [s[0] for s in shapes], [s[2] for s in shapes]
    metadata = {
        "model": name,
        "model_kwargs": kwargs,
        "compact": True,
        "blocks": [{"heads": h, "mlp_hidden": m} for h, m in zip(heads, hidden, strict=True)],
        "token_selection": [{"before_block": b, "keep_ratio": r} for b, r in selectors],
        **source,
    }
    file = out / ONNX_FILE
    with locked_folder(out, busy, cannot):
        diff, written = _export(model, file, None, metadata)
        stale = out / ONNX_FILES[1]
        if stale.name not in written and stale.exists():
            stale.unlink()  # an earlier, larger export's weights: the new graph reads none
    channels, height, width = model_input_size(model)
    return OnnxExport(
        path=file,
        input_shape=("batch", channels, height, width),
        heads=heads,
        mlp_hidden=hidden,
        token_selection=selectors,
        max_rel_diff=diff,
    )


__all__ = [
    "OPSET",
    "OnnxExport",
    "convert_export",
    "default_output",
    "export_onnx",
    "export_run_onnx",
    "is_onnx_export",
    "refuse_with_format",
    "relative_difference",
    "require_onnx",
]
