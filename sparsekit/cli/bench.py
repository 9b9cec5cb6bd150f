"""`sparsekit bench EXPORT`: time an export against its dense model, side by side."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sparsekit.cli.errors import reports_errors
from sparsekit.errors import UsageError

MAX_BATCH = 4096


@reports_errors
def bench(
    export: Annotated[Path, typer.Argument(help="A sparsekit export (its folder).")],
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--batch-size", min=1, help="Batch size to time; repeat it for several (default 1 64)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="float32, bfloat16, or float16 (CUDA) for the PyTorch timings.")
    ] = "float32",
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads for PyTorch and ONNX Runtime (default: theirs)."),
    ] = None,
    iters: Annotated[int, typer.Option(min=1, max=10_000, help="Timed forwards per model.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, max=1000, help="Untimed forwards first.")] = 2,
    onnx: Annotated[
        bool | None,
        typer.Option(
            "--onnx/--no-onnx",
            help="Also time both in ONNX Runtime on the CPU (default: when it is installed).",
        ),
    ] = None,
    accelerate: Annotated[
        bool,
        typer.Option(
            "--accelerate",
            help="CUDA (compute capability 8.0+), float16 or bfloat16: the export's 2:4 layers "
            "as semi-structured sparse tensors (load_compact(accelerate=...)).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
) -> None:
    """Time EXPORT against its dense model (the same architecture at full size) in eval mode,
    interleaved, and print the median times and their ratio."""
    from sparsekit.analysis.bench import DTYPES, bench
    from sparsekit.analysis.cost import model_cost
    from sparsekit.device import pick_device
    from sparsekit.export.loader import built_export, read_export
    from sparsekit.models import ModelSpec, create_model

    batches = batch_size or [1, 64]
    if max(batches) > MAX_BATCH:
        raise UsageError(f"--batch-size {max(batches)}: at most {MAX_BATCH}.")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    where = pick_device(device)
    if onnx is None:
        onnx = importlib.util.find_spec("onnxruntime") is not None
    manifest, tensors = read_export(export)
    model = built_export(export, manifest, tensors)
    if accelerate:
        from sparsekit.export.accelerate import accelerated

        if dtype == "float32":
            raise UsageError(
                "--accelerate: semi-structured sparse kernels run float16 or bfloat16; add "
                "--dtype float16 or --dtype bfloat16."
            )
        model = accelerated(model, manifest.nm_layers, str(export), dtype)
    dense = create_model(ModelSpec(manifest.model, manifest.model_kwargs))
    costs = [model_cost(m) for m in (dense, model)]
    timings = bench(model, dense, batches, where, dtype, threads, iters, warmup, onnx)
    record = {
        "export": str(export),
        "model": manifest.model,
        "compact": manifest.compact,
        "device": str(where),
        "dtype": dtype,
        "accelerate": accelerate,
        "threads": threads,
        "iters": iters,
        "params": {"dense": costs[0].params, "export": costs[1].params},
        "flops": {"dense": costs[0].flops, "export": costs[1].flops},
        "flops_ratio": costs[1].flops / costs[0].flops,
        "timings": [t.to_dict() for t in timings],
    }
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    table = Table(
        title=f"{export}: {manifest.model}, {'compact' if manifest.compact else 'masked'}, "
        f"{where}, {dtype}, FLOPs ratio {record['flops_ratio']:.3f}"
    )
    for column in ("backend", "batch", "dense ms", "export ms", "export / dense"):
        table.add_column(column, justify="right")
    for t in timings:
        table.add_row(
            t.backend, str(t.batch), f"{t.dense_ms:.2f}", f"{t.export_ms:.2f}", f"{t.ratio:.3f}"
        )
    Console().print(table)
