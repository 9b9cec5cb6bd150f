"""The run folder: what `sparsekit apply` writes and everything else reads back (export,
report, inspect, `--resume`). The modules of this package are the only code that knows its
files; they import nothing from `train`, `export`, `analysis` or `cli`, which all go through
them.

    layout.py       the file names
    records.py      recipe.yaml, run.json, metrics.jsonl (and metrics.csv, derived from it),
                    summary.json: written atomically (or appended), read back checked
    checkpoint.py   checkpoint.pt: the format, its hash, weights-only loading, RNG capture;
                    checkpoint-best.pt, its copy at the best epoch
    samples.py      val_samples.safetensors: validation images for the report's token map
    claim.py        a folder is sparsekit's run folder (marker) and one process's at a time
    trained_run.py  open_run: the last (or best) checkpoint's model, recipe, weights and masks
"""
