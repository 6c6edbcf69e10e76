"""Directories opened without following symlinks, so a check cannot be raced.

Targets are validated once, at configuration time, with ``realpath``. A directory on the way
could be swapped for a symlink afterwards (between the HEADs and the first write), sending the
artifact, or the removal of stale temp files, somewhere else. Every file operation on a target
therefore goes through a descriptor of its parent directory that was opened one component at a
time with ``O_NOFOLLOW`` from the root it must stay in: once open, the descriptor names that
directory, whatever happens to the path later.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class UnsafePath(OSError):
    """A path component is a symlink or not a directory where one must be."""


def open_dir(root: Path, directory: Path, create: bool = False) -> int:
    """A descriptor of ``directory``, reached from ``root`` without following any symlink
    below ``root`` (which was resolved already); missing components are created if asked."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(root, exist_ok=True)  # the code dir or an allowed root: the operator's own
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in directory.relative_to(root).parts:
            child = _child(fd, part, directory, create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _child(parent: int, name: str, directory: Path, create: bool) -> int:
    """Open ``name`` under ``parent`` as a real directory (never through a symlink)."""
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(exc.errno, f"{name} is a symlink or not a directory on the way to "
                                        f"{directory}") from None
        raise


def fsync_dir(dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)
