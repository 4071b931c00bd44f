"""An exclusive lock on a folder, for read-modify-writes that several processes make in it."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

__all__ = ["folder_lock"]


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive ``flock`` on ``folder`` itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
