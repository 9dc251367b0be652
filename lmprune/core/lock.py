"""One writer per output folder: `OUT/.lmprune.core.lock`, held with flock by the process that
writes there (its pid inside). The kernel releases it when that process ends, killed or not, so
a stale lock never blocks a resumed run."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from lmprune.core.errors import LmpruneError
from lmprune.core.io import LOCK_FILE


@contextlib.contextmanager
def folder_lock(folder: str | Path):
    """Hold the folder's lock (creating the folder) for the duration; a second process gets
    one line naming the pid that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LmpruneError(f"{folder} is in use by another lmprune process (pid {holder}): "
                               f"wait for it to end, or choose another output folder") from None
        pid = f"{os.getpid()}\n".encode()
        if os.pread(fd, 32, 0) != pid:  # rewritten only when another process held it last
            os.ftruncate(fd, 0)
            os.pwrite(fd, pid, 0)
        yield path
    finally:
        os.close(fd)
