"""The store's ``--data-dir``: private (0700), and a lock telling whether another process is using it.

Every process that opens the store holds a shared ``flock`` on ``store.lock`` for its lifetime (the kernel
drops it when the process dies, SIGKILL included). A process that gets it exclusively first knows nobody
else is writing, so it may delete every temp file and unreferenced blob a killed process left behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import UserError

LOCK_NAME = "store.lock"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


class DataDirLock:
    """A shared lock on the data directory, held until ``release`` (or the process ends)."""

    def __init__(self, data_dir: Path) -> None:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True  # no other process has the store open
        except BlockingIOError:
            self.alone = False
            fcntl.flock(fd, fcntl.LOCK_SH)
        self.fd = fd

    def share(self) -> None:
        """Hold the lock shared from now on (after the exclusive clean-up), so other processes may open the store."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_private(data_dir: Path) -> DataDirLock:
    """Create ``data_dir`` 0700 (tightening an existing one) and lock it; a one-line error for a file."""
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file: pass a directory as --data-dir")
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(data_dir, PRIVATE_DIR)
    return DataDirLock(data_dir)


def private_file(path: Path) -> None:
    """Create ``path`` 0600 if absent (before SQLite does, with the umask's mode), else tighten it to 0600."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    os.chmod(path, PRIVATE_FILE)
