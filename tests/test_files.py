"""Tests for aenet_dist.files: removing the run directory of a failed start, and locks that stay
exclusive when a lock file is removed under a process that is about to take it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aenet_dist.files import LOCK_NAME, DirectoryInUse, first_missing, lock_directory, lock_file, remove_unused_directory, unlock


def test_remove_unused_directory_removes_only_what_this_start_created(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    created = first_missing(run_dir)
    assert created == Path(os.path.realpath(tmp_path)) / "runs"
    fd = lock_directory(run_dir, "run directory")
    (run_dir / "config.toml").write_text("# resolved\n")
    assert remove_unused_directory(run_dir, created, fd, (LOCK_NAME, "config.toml"))
    unlock(fd)
    assert not (tmp_path / "runs").exists()
    # anything else in it (a checkpoint, metrics): kept, lock file and all
    fd = lock_directory(run_dir, "run directory")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert not remove_unused_directory(run_dir, created, fd)
    unlock(fd)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "metrics.jsonl"]
    # a directory that existed before (created is None), or one not locked by this process: kept
    (run_dir / "metrics.jsonl").unlink()
    fd = lock_directory(run_dir, "run directory")
    assert first_missing(run_dir) is None and not remove_unused_directory(run_dir, None, fd)
    assert not remove_unused_directory(run_dir, tmp_path / "runs", None)
    unlock(fd)
    assert run_dir.is_dir()
    # a parent that something else was put into meanwhile stays
    other = tmp_path / "new" / "b"
    created = first_missing(other)
    fd = lock_directory(other, "run directory")
    (tmp_path / "new" / "sibling").mkdir()
    assert remove_unused_directory(other, created, fd)
    unlock(fd)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["sibling"]


def test_a_run_directory_reached_through_a_missing_folder_and_dotdot_is_not_taken_for_new(tmp_path):
    """``runs/missing/../a`` is ``runs/a``: if that exists with the user's files, a failed start removes nothing."""
    existing = tmp_path / "runs" / "a"
    existing.mkdir(parents=True)
    (existing / "config.toml").write_text("# the user's\n")
    through = tmp_path / "runs" / "missing" / ".." / "a"
    created = first_missing(through)
    assert created is None
    fd = lock_directory(existing, "run directory")
    assert not remove_unused_directory(through, created, fd, (LOCK_NAME, "config.toml"))
    unlock(fd)
    assert (existing / "config.toml").read_text() == "# the user's\n"


def test_lock_taken_on_a_removed_lock_file_is_taken_again(tmp_path, monkeypatch):
    """A process that opened the lock file just before a failed start removed it (remove_unused_directory)
    would lock a file no one else sees, while a third process locks a new one: two holders.
    lock_file checks that the file it locked is still the one at its path, and locks again if not."""
    path = tmp_path / "d" / LOCK_NAME
    real_open, opened = os.open, []

    def open_then_removed(file, flags, mode=0o777):  # the failed start removes the file (and its directory) meanwhile
        fd = real_open(file, flags, mode)
        if not opened:
            opened.append(fd)
            os.unlink(file)
            os.rmdir(os.path.dirname(file))
        return fd

    monkeypatch.setattr(os, "open", open_then_removed)
    fd = lock_file(path, "run directory")
    monkeypatch.undo()
    try:
        assert len(opened) == 1 and os.stat(path).st_ino == os.fstat(fd).st_ino  # the lock is on the file at the path
        with pytest.raises(DirectoryInUse, match=f"PID {os.getpid()}"):
            lock_file(path, "run directory")
    finally:
        unlock(fd)
