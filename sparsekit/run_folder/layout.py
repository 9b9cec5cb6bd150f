"""The names of the files in a run folder, in one place.

A run folder holds `recipe.yaml` (the resolved recipe), `run.json` (model and data),
`checkpoint.pt` (last epoch), `checkpoint-best.pt` (the epoch of the best validation accuracy
so far, a copy of that epoch's checkpoint.pt), `metrics.jsonl` (one line per epoch, with
per-layer sparsity, and per prune/grow update), `metrics.csv` (the epoch lines' scalars, one row
per epoch: derived from metrics.jsonl, never read back), `summary.json` (final accuracy,
sparsity and parameter counts, once the last epoch is done), the marker `.sparsekit-run`, with
`apply --tensorboard` the folder `tensorboard/` (TensorBoard event files) and, when the recipe
selects tokens, `val_samples.safetensors` (a few validation images for the report's token map).
"""

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_CHECKPOINT_FILE = "checkpoint-best.pt"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "val_samples.safetensors"
MARKER_FILE = ".sparsekit-run"
TENSORBOARD_DIR = "tensorboard"
