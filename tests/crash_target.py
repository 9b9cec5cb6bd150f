"""Writes checkpoints or exports in a loop until it is killed (driven by test_crash_safety.py).

python tests/crash_target.py FOLDER checkpoint|export
"""

import sys
from pathlib import Path

import sparsekit.export.writer as writer
from sparsekit.export import export_model
from sparsekit.models import ModelSpec, create_model
from sparsekit.run_folder.checkpoint import save_checkpoint

# Say when the files start to be written, so the test can aim its kills at the writing.
write_files = writer._write


def announced_write(*args, **kwargs):
    print("writing", flush=True)
    return write_files(*args, **kwargs)


writer._write = announced_write

folder, mode, first = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
spec = ModelSpec("vit_small_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 10})
state = create_model(spec).state_dict()
print("ready", flush=True)
version = first - 1
while True:
    version += 1
    for tensor in state.values():  # every tensor says which version it belongs to
        tensor.fill_(version)
    if mode == "checkpoint":
        print("writing", flush=True)
        save_checkpoint(folder / "checkpoint.pt", {"epoch": version, "model": state})
    else:
        export_model(spec, state, folder / "export", recipe_yaml=f"version: {version}\n")
    print(version, flush=True)
