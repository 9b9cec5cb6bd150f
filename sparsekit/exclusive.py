"""One writer at a time: an exclusive, non-blocking `flock` held while a process writes a folder,
and only into a folder that is new, empty, or sparsekit's own (a run, an export, a report).

The kernel drops a `flock` when the process that holds it ends, however it ends (a crash,
SIGKILL, power loss), so a dead writer never leaves anything blocked and there is no stale lock
file to detect or clean up. `flock` works on local file systems; some network file systems do
not enforce it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsekit.errors import SparsekitError


@contextmanager
def exclusive(fd: int, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the open file or folder `fd` for the block, then close it.

    Raises:
        SparsekitError: with the message `busy`, when another process holds the lock.
    """
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SparsekitError(busy) from None
        yield
    finally:
        os.close(fd)  # closing drops the lock


def refuse_unless_ours(
    folder: Path, ours: Callable[[Path], bool], is_file: str, not_ours: str
) -> None:
    """Refuse, with the caller's messages, a path that is a file or a folder holding anything
    `ours` does not recognise as sparsekit's; nothing in it is touched.

    Raises:
        SparsekitError: `is_file` or `not_ours`.
    """
    if folder.exists() and not folder.is_dir():
        raise SparsekitError(is_file)
    if folder.is_dir() and any(folder.iterdir()) and not ours(folder):
        raise SparsekitError(not_ours)


@contextmanager
def locked_folder(
    folder: Path, busy: str, cannot_create: Callable[[str], str], lock_file: str | None = None
) -> Iterator[int]:
    """Create `folder` if needed and hold the exclusive lock on it (or on the file `lock_file`
    inside it) for the block; yield the locked descriptor. A block that fails and leaves the
    folder holding nothing but the lock file leaves nothing behind: the lock file goes, and
    the folder too when this made it (removed while still locked, so no second writer can
    have claimed it in between).

    Raises:
        SparsekitError: `cannot_create(reason)` when the folder or lock file cannot be made;
            `busy` when another process holds the lock.
    """
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if lock_file is None:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(folder / lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SparsekitError(cannot_create(err.strerror or str(err))) from None
    with exclusive(fd, busy):
        try:
            yield fd
        except BaseException:
            if not {p.name for p in folder.iterdir()} - {lock_file}:
                if lock_file is not None:
                    (folder / lock_file).unlink()
                if created:
                    folder.rmdir()
            raise
