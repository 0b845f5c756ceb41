"""File-system helpers shared by the commands: atomic writes, and exclusive locks on run
directories and stores.

A lock is ``fcntl.flock`` on a lock file (``.lock`` inside a run directory, ``.<name>.lock``
beside a store), which holds the owner's PID and host. The kernel releases it when the process ends, however it ends (kill -9 included),
so a stale lock file never blocks a later run. A run directory's ``.lock`` stays (it is inside the
run's own directory); a store's lock file beside the store is removed by featurize on the way out,
while still held. Removing a lock file lets a process that opened it just before lock the removed
file while another locks a new one (two holders), so :func:`lock_file` checks that the file it
locked is still the one at the path, and tries again when it is not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

LOCK_NAME = ".lock"
TMP_SUFFIX = ".aenet-tmp"  # temporary files of atomic_write: ".<name>.<random>.aenet-tmp"


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
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise DirectoryInUse(f"{what} is in use by {holder} (lock {path}); wait for that run to end "
                                 "or choose another one") from None
        try:  # the file locked must still be the one at ``path``: remove_unused_directory deletes it
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        path.parent.mkdir(parents=True, exist_ok=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd


def unlock(fd: int | None) -> None:
    """Release a lock taken with :func:`lock_directory` (None: nothing to do)."""
    if fd is not None:
        os.close(fd)


def first_missing(directory: str | os.PathLike) -> Path | None:
    """The outermost of ``directory`` and its parents that does not exist (what creating it creates), or None."""
    missing = None
    real = Path(os.path.realpath(directory))  # "a/missing/../b" is a/b, which may well exist
    for candidate in (real, *real.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing = candidate
    return missing


def remove_unused_directory(directory: str | os.PathLike, created: Path | None, fd: int | None,
                            disposable: tuple[str, ...] = (LOCK_NAME,)) -> bool:
    """Remove ``directory``, which this process created (from ``created`` down, see :func:`first_missing`)
    and locks (``fd``), if it holds nothing but the files named in ``disposable``; then the parents
    it created, while empty. Call it before :func:`unlock`. Returns whether ``directory`` was removed.

    A failed start must not leave an empty run directory behind (``runs/x/`` with only ``.lock``),
    but a directory that existed before, or one that holds anything else (a checkpoint, metrics),
    is the user's and stays.
    """
    directory = Path(os.path.realpath(directory))  # as first_missing saw it
    if created is None or fd is None or not directory.is_dir() or not (directory == created or created in directory.parents):
        return False
    try:
        if any(entry.name not in disposable for entry in directory.iterdir()):
            return False
        for name in disposable:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        directory.rmdir()
        for parent in directory.parents:
            if parent != created and created not in parent.parents:
                break
            parent.rmdir()  # OSError (not empty) ends the climb: something else is in it now
    except OSError:
        pass
    return not directory.exists()


# What to do about an OSError that reached the handler without a message of ours, by errno.
OS_ERROR_ADVICE = {
    errno.ENOENT: "check the path",
    errno.EEXIST: "remove it or choose another path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.ENOSPC: "free space or choose another file system",
    errno.EROFS: "choose a writable file system",
}


def describe_os_error(err: OSError) -> str:
    """An OSError as one sentence with the path and what to do, not Python's ``[Errno 2] ...: 'x'``."""
    if not err.strerror:
        return str(err)
    where = f"{err.filename}: " if err.filename is not None else ""
    also = f" (and {err.filename2})" if err.filename2 is not None else ""
    advice = OS_ERROR_ADVICE.get(err.errno)
    return f"{where}{err.strerror[:1].lower()}{err.strerror[1:]}{also}" + (f"; {advice}" if advice else "")


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write a file so that readers see the old content or the new, never a part.

    ``content`` is bytes, text (UTF-8), or a function that writes into a binary file object.
    The data go to a temporary file in the target's directory, are flushed to disk (fsync),
    get the permissions a plain ``open`` would give (0666 less the umask: a potential exported
    to a shared directory stays readable by the group's LAMMPS jobs), and replace the target.
    A symlink is followed (its target is replaced, the link stays); a target that is not a
    regular file (a device, a FIFO, /dev/stdout) is written directly. Nothing is left behind
    when writing fails.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    write = content if callable(content) else (lambda fh: fh.write(content.encode() if isinstance(content, str) else content))
    if path.exists() and not path.is_file():
        with open(path, "wb") as fh:
            write(fh)
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when its process is killed mid-write.

    Call it only while holding the directory's lock (no live writer then). Returns what was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale
