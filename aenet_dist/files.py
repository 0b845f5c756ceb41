"""File-system helpers shared by the commands: exclusive locks on run directories and stores.

A lock is ``fcntl.flock`` on a lock file (``.lock`` inside a run directory, ``.<name>.lock``
beside a store), which holds the owner's PID and host. The kernel releases it when the process ends, however it ends (kill -9 included),
so a stale lock file never blocks a later run.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class DirectoryInUse(ValueError):
    """Another process holds the directory's lock (the message names it)."""


def lock_directory(directory: str | os.PathLike, what: str) -> int:
    """Take the exclusive lock of ``directory`` (created if missing) through its ``.lock`` file.

    Returns the open descriptor: keep it open for as long as the directory is in use; closing
    it (or exiting) releases the lock.

    Raises:
        DirectoryInUse: another process holds it; the message names its PID and host.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return lock_file(directory / LOCK_NAME, f"{what} {directory}")


def lock_file(path: str | os.PathLike, what: str) -> int:
    """Take the exclusive lock of the file ``path`` (created if missing) for ``what``; see :func:`lock_directory`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise DirectoryInUse(f"{what} is in use by {holder} (lock {path}); wait for that run to end "
                             "or choose another one") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd


def unlock(fd: int | None) -> None:
    """Release a lock taken with :func:`lock_directory` (None: nothing to do)."""
    if fd is not None:
        os.close(fd)
