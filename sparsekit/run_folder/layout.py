"""The names of the files in a run folder, in one place.

A run folder holds `recipe.yaml` (the resolved recipe), `run.json` (model and data),
`checkpoint.pt` (last epoch), `metrics.jsonl` (one line per epoch, with per-layer sparsity, and
per prune/grow update), `summary.json` (final accuracy, sparsity and parameter counts, once the
last epoch is done), the marker `.sparsekit-run` and, when the recipe selects tokens,
`val_samples.safetensors` (a few validation images for the report's token map).
"""

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "val_samples.safetensors"
MARKER_FILE = ".sparsekit-run"
