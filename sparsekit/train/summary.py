"""The end of a run: what `summary.json` says (final and best accuracy, sparsity, parameter and
unit counts, the compacted export's cost) and the table printed under it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from sparsekit.analysis.cost import model_cost
from sparsekit.analysis.sparsity import sparsity_report
from sparsekit.export.baked import baked_model
from sparsekit.models import ModelSpec, create_model
from sparsekit.run_folder.records import read_metrics
from sparsekit.session import Session


def summarize(
    out: Path, spec: ModelSpec, data_name: str, model: nn.Module, session: Session
) -> dict[str, Any]:
    """The summary of a finished run: from its metrics.jsonl, the model and its masks."""
    records = read_metrics(out)
    epochs = [r for r in records if r.get("event") == "epoch"]
    last = epochs[-1] if epochs else {}
    return {
        "model": spec.name,
        "model_kwargs": spec.kwargs,
        "data": data_name,
        "epochs": session.timeline.epochs,
        "steps": session.step,
        "val_acc": last.get("val_acc", math.nan),
        "val_loss": last.get("val_loss", math.nan),
        "best_val_acc": max((e["val_acc"] for e in epochs), default=math.nan),
        # training.ema: the moving average's accuracy at the last epoch
        **(
            {"ema_val_acc": last["ema_val_acc"], "ema_val_loss": last["ema_val_loss"]}
            if "ema_val_acc" in last
            else {}
        ),
        "updates": sum(1 for r in records if r.get("event") == "mask_update"),
        "time_s": last.get("time_s", 0.0),
        "sparsity": sparsity_report(model, session.masks()),
        "units": {
            name: {"kept": int(keep.sum()), "total": keep.numel()}
            for name, keep in session.unit_masks().items()
        },
        "export_cost": export_cost(spec, model, session),
    }


def export_cost(spec: ModelSpec, model: nn.Module, session: Session) -> dict[str, int]:
    """What `sparsekit export --compact` of this model will cost per image, beside dense:
    the compacted model is built in memory as the export builds it, and counted."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    masks = {k: v.cpu() for k, v in session.masks().items()}
    units = {k: v.cpu() for k, v in session.unit_masks().items()}
    compact = model_cost(baked_model(spec, state, masks, units, session.token_placements()))
    dense = model_cost(create_model(spec))
    return {
        "flops": compact.flops,
        "params": compact.params,
        "nonzero_params": compact.nonzero_params,
        "dense_flops": dense.flops,
        "dense_params": dense.params,
    }


def summary_table(summary: dict[str, Any], out: Path) -> Table:
    """The final table printed at the end of a run."""
    table = Table(title=f"sparsekit run: {out}", show_header=False)
    sp = summary["sparsity"]
    rows = [
        ("model", summary["model"]),
        ("data", summary["data"]),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("val accuracy (final)", f"{summary['val_acc']:.4f}"),
        ("val accuracy (best)", f"{summary['best_val_acc']:.4f}"),
    ]
    if "ema_val_acc" in summary:
        rows.append(("EMA val accuracy (final)", f"{summary['ema_val_acc']:.4f}"))
    if sp["masked_params"]:
        rows.append(
            (
                "sparsity of targets",
                f"{sp['global_sparsity']:.4f} ({sp['masked_kept']:,} of {sp['masked_params']:,} "
                "kept)",
            )
        )
    rows.append(("non-zero parameters", f"{sp['nonzero_params']:,} of {sp['total_params']:,}"))
    cost = summary.get("export_cost")
    if cost:
        rows.append(
            (
                "export (--compact), per image",
                f"{cost['flops'] / 1e6:,.2f} MFLOPs ({cost['flops'] / cost['dense_flops']:.3f}x "
                f"dense), {cost['params']:,} parameters ({cost['params'] / cost['dense_params']:.3f}"
                "x dense)",
            )
        )
    for kind, suffix in (("heads", ".attn"), ("MLP neurons", ".mlp")):
        units = [u for name, u in summary["units"].items() if name.endswith(suffix)]
        if units:
            kept, total = sum(u["kept"] for u in units), sum(u["total"] for u in units)
            rows.append((f"{kind} kept", f"{kept:,} of {total:,} ({kept / total:.3f})"))
    for key, value in rows:
        table.add_row(key, str(value))
    return table
