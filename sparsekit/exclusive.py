"""One writer at a time: an exclusive, non-blocking `flock` held while a process writes a folder.

The kernel drops a `flock` when the process that holds it ends, however it ends (a crash,
SIGKILL, power loss), so a dead writer never leaves anything blocked and there is no stale lock
file to detect or clean up. `flock` works on local file systems; some network file systems do
not enforce it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

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
