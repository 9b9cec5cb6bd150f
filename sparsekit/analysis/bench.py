"""An export timed against its dense model, side by side, where it will run (`sparsekit bench`).

The dense model is the export's own architecture at full size (every head, neuron and token,
its weights random: time does not depend on them). The two run in eval mode on the same input,
one forward after the other, alternating which goes first, after a warm-up, so drift of the
machine (clocks, caches, other processes) falls on both alike; the ratio of the medians is what
the export saves. With ONNX Runtime installed, both are exported to ONNX and timed the same way
in it.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery.geometry import input_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Timing:
    """Median milliseconds per forward of one batch, for one backend and batch size."""

    backend: str  # "pytorch" or "onnxruntime"
    batch: int
    dense_ms: float
    export_ms: float

    @property
    def ratio(self) -> float:
        """Export time over dense time: below 1, the export is faster."""
        return self.export_ms / self.dense_ms

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "ratio": self.ratio}


def bench(
    export: nn.Module,
    dense: nn.Module,
    batches: list[int],
    device: torch.device,
    dtype: str = "float32",
    threads: int | None = None,
    iters: int = 20,
    warmup: int = 3,
    onnx: bool = False,
) -> list[Timing]:
    """Time `export` against `dense` at each batch size, with PyTorch and (with `onnx`) with
    ONNX Runtime on the CPU.

    Raises:
        SparsekitError: a dtype the device cannot run, or ONNX Runtime asked for but missing.
    """
    kind = DTYPES[dtype]
    if kind == torch.float16 and device.type == "cpu":
        raise SparsekitError(
            "--dtype float16: PyTorch runs float16 matrix products slowly or not at all on the "
            "CPU, so its times would say nothing about deployment; use float32 or bfloat16 on "
            "the CPU, or float16 with --device cuda."
        )
    channels, height, width = input_size(export)
    size = (height, width)
    timings = []
    with _threads(threads):
        models = [m.to(device=device, dtype=kind).eval() for m in (dense, export)]
        for batch in batches:
            x = torch.randn(batch, channels, *size, device=device, dtype=kind)
            dense_s, export_s = _interleaved([_torch_forward(m, x) for m in models], iters, warmup)
            timings.append(Timing("pytorch", batch, 1e3 * dense_s, 1e3 * export_s))
        if onnx:
            timings += _onnx_timings(models, batches, channels, size, threads, iters, warmup)
    return timings


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    return forward


def _interleaved(forwards: list[Callable[[], None]], iters: int, warmup: int) -> list[float]:
    """Median seconds of each forward, run in turn (the first one alternating) after `warmup`
    rounds."""
    times: list[list[float]] = [[] for _ in forwards]
    for step in range(warmup + iters):
        order = list(range(len(forwards)))
        if step % 2:
            order.reverse()
        for index in order:
            start = time.perf_counter()
            forwards[index]()
            if step >= warmup:
                times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _onnx_timings(
    models: list[nn.Module],
    batches: list[int],
    channels: int,
    size: tuple[int, int],
    threads: int | None,
    iters: int,
    warmup: int,
) -> list[Timing]:
    """Both models exported to ONNX (float32, dynamic batch) and timed in ONNX Runtime's CPU
    provider."""
    try:
        import onnxruntime
    except ImportError:
        raise SparsekitError(
            "--onnx: ONNX Runtime is not installed; pip install 'sparsekit[onnx]' (onnx, "
            "onnxscript, onnxruntime), or leave out --onnx."
        ) from None
    from sparsekit.export.onnx import export_onnx

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for name, model in zip(("dense", "export"), models, strict=True):
            path = export_onnx(
                model.to(device="cpu", dtype=torch.float32), Path(tmp) / f"{name}.onnx"
            )
            sessions.append(
                onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            )
        timings = []
        for batch in batches:
            x = torch.randn(batch, channels, *size).numpy()

            def run(session, x=x):
                return lambda: session.run(None, {session.get_inputs()[0].name: x})

            dense_s, export_s = _interleaved([run(s) for s in sessions], iters, warmup)
            timings.append(Timing("onnxruntime", batch, 1e3 * dense_s, 1e3 * export_s))
    return timings
