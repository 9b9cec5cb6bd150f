"""Write files so that a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and renamed over
    `path` in one step, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_torn(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp made it owner-only
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_torn(path: Path) -> None:
    """Remove what an earlier writer of `path` killed mid-write left beside it (its hidden
    temporary files or folders); the target itself is never touched."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically.

    Raises:
        SparsekitError: the file cannot be written there (a full disk, no permission, or a
            folder in the file's place); whatever was there before is untouched.
    """
    from sparsekit.errors import SparsekitError

    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as err:
        raise SparsekitError(
            f"cannot write {path} ({err.strerror or err}); what was there is untouched. Free disk "
            "space, fix the folder's permissions, or move what is in the file's place."
        ) from None


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
