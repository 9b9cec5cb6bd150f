"""A run folder belongs to the sparsekit run that made it, and to one writing process at a time.

A folder becomes a run folder when `sparsekit apply` creates it (or finds it new or empty) and
writes the marker file `.sparsekit-run` into it; a folder that holds anything else is the
user's and is refused untouched. While a process trains, it holds an exclusive lock on the
marker (`sparsekit.exclusive`), so a second `sparsekit apply` on the same `--output` is refused
instead of interleaving its metrics and recipe with the first run's; a crashed run never leaves
the folder blocked.

Run folders written before the marker existed (with `run.json` and `checkpoint.pt`) are
recognised as sparsekit's and get the marker when claimed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsekit.exclusive import locked_folder, refuse_unless_ours
from sparsekit.run_folder.layout import CHECKPOINT_FILE, MARKER_FILE, RUN_FILE

_CONTENT = b"sparsekit run folder: written by `sparsekit apply`; locked while a run trains.\n"


def is_run_folder(folder: Path) -> bool:
    """Whether sparsekit made this folder as a run folder (marker, or an older run's files)."""
    return (folder / MARKER_FILE).is_file() or (
        (folder / RUN_FILE).is_file() and (folder / CHECKPOINT_FILE).is_file()
    )


@contextmanager
def claim_run_folder(folder: Path) -> Iterator[None]:
    """Own `folder` as a run folder for the duration of the block: create it (or take a new or
    empty one, or a sparsekit run folder), mark it, and hold its lock.

    Raises:
        SparsekitError: the path is a file, the folder holds files sparsekit did not write, or
            another process is writing this run folder now.
    """
    refuse_unless_ours(
        folder,
        is_run_folder,
        is_file=f"--output {folder} is a file, not a folder; give a folder for the run "
        "(new, empty, or one that sparsekit apply created).",
        not_ours=f"--output {folder} already holds files that sparsekit did not write (it has no "
        f"{MARKER_FILE} marker), so it is not a run folder; nothing in it was touched. Give a new "
        "or empty folder for the run.",
    )
    busy = (
        f"--output {folder} is in use: another sparsekit process is writing this run folder "
        "now. Wait for it to finish (then continue it with --resume if it stopped early), or "
        "give another --output folder."
    )

    def cannot(reason: str) -> str:
        return (
            f"--output {folder}: cannot create the run folder there ({reason}); give a folder "
            "you can write."
        )

    with locked_folder(folder, busy, cannot, lock_file=MARKER_FILE) as fd:
        if os.fstat(fd).st_size == 0:
            os.write(fd, _CONTENT)
        yield
