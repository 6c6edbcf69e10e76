"""Publishing one file: its temp file beside the target, then verify and rename, or remove.

Every step works through a descriptor of the target's directory (``dirfd.open_dir``), so a
directory swapped for a symlink after validation is never followed. The temp file is created
under the target's lock, adopting a dead attempt's journal and temp file when one matches.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .cache import DebrisIndex, Manifest, ManifestEntry, ResumeJournal
from .checksums import DigestSet
from .dirfd import UnsafePath, fsync_dir, open_dir
from .plan import FileTransfer, split_ranges
from .s3io import FatalFailure, RemoteObject
from .settings import LazyLoadingSettings
from .verify import part_check_algorithm, parts_failing_their_crc, verify

logger = logging.getLogger("lazy_loading")


class Publisher:
    """Creates, publishes or discards the temp files of one run (blocking: run in a thread)."""

    def __init__(self, state_dir: Path, settings: LazyLoadingSettings, manifest: Manifest,
                 cancel: threading.Event) -> None:
        self._state_dir = state_dir
        self._manifest = manifest
        self._settings = settings
        self._cancel = cancel
        self._debris = DebrisIndex()  # one listing per directory per run
        self._dirs = _LastDirectories()

    def prepare(self, transfer: FileTransfer, remote: RemoteObject, part_size: int,
                 multipart: bool, temp: Path) -> tuple[ResumeJournal | None, int, int]:
        """Under the target lock: open the target's directory without following symlinks,
        adopt a dead attempt's journal, sweep debris, create the temp file in that directory.
        Returns the journal, the temp file's descriptor and the directory's."""
        target = transfer.target
        try:
            dir_fd = self._dirs.open(transfer.root, target.parent)
        except UnsafePath as exc:
            raise FatalFailure(f"{target}: {exc.strerror}; refusing to write there") from None
        except OSError as exc:
            raise _unwritable(target, exc) from None
        try:
            journal, fd = self._create_temp(transfer, remote, part_size, multipart, temp, dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        return journal, fd, dir_fd

    def _create_temp(self, transfer: FileTransfer, remote: RemoteObject, part_size: int,
                     multipart: bool, temp: Path, dir_fd: int) -> tuple[ResumeJournal | None, int]:
        target = transfer.target
        try:
            # Only a journal keeps part CRCs: asking for one loads awscrt, which a file of one
            # part, checked inline with zlib's CRC32 or hashlib, never needs.
            crc = part_check_algorithm(remote, self._settings) if multipart else None
            journal = (ResumeJournal.resume(self._state_dir, target, remote, part_size, crc,
                                            self._settings.fsync)
                       if multipart else None)
            self._debris.remove_stale_records(self._state_dir, target)
            for stale in self._debris.temp_names(target, dir_fd):
                if journal is None or stale != journal.temp.name:
                    with contextlib.suppress(OSError):
                        os.unlink(stale, dir_fd=dir_fd)
                        logger.info("removed leftover %s", stale)
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            if journal is not None:
                journal.adopt(temp, dir_fd)
            else:
                flags |= os.O_EXCL
            fd = os.open(temp.name, flags, 0o644, dir_fd=dir_fd)
            if journal is not None and journal.done:
                self._check_resumed_parts(journal, fd)
        except OSError as exc:
            raise _unwritable(target, exc) from None
        try:
            if journal is None and remote.size:
                try:
                    os.posix_fallocate(fd, 0, remote.size)
                except OSError as exc:
                    if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: fall back to a sparse file
                        raise
                    os.ftruncate(fd, remote.size)
            if multipart and journal is None:
                journal = ResumeJournal(self._state_dir, target, remote, part_size, temp, crc,
                                        durable=self._settings.fsync)
                journal.start()
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp.name, dir_fd=dir_fd)
            raise FatalFailure(f"{target}: cannot create the download file: {exc.strerror}") from None
        return journal, fd

    def _check_resumed_parts(self, journal: ResumeJournal, fd: int) -> None:
        """After a power cut a record can be on disk while its part's bytes are not (zeros in
        their place): journaled parts are read back and checked against their CRCs, and
        without CRCs, fetched again unless written since the machine started or synced."""
        ranges = [r for r in split_ranges(journal.remote.size, journal.part_size)
                  if r.index in journal.done]
        if journal.crc_algorithm is not None:
            bad = parts_failing_their_crc(fd, ranges, journal.crcs, journal.crc_algorithm,
                                          self._cancel)
            why = "failed their check"
        else:
            bad = set() if journal.parts_trusted else {r.index for r in ranges}
            why = "were written before this machine restarted, and never synced"
        if bad:
            logger.warning("%d resumed part(s) of %s %s; fetching them again",
                           len(bad), journal.target, why)
            journal.forget(bad)
            journal.start()

    def finish(self, transfer: FileTransfer, remote: RemoteObject, fd: int, temp: Path,
               dir_fd: int, digests: DigestSet, inline: bool, combined: str | None,
               entry_for: Callable[[int], ManifestEntry]) -> tuple[int, bool]:
        """Verify, attach the manifest record made by ``entry_for`` from the file's mtime,
        optionally fsync, and atomically rename the temp file onto the target, both named in the
        directory open as ``dir_fd``. Returns the published file's mtime, and whether its
        record went with it (else the caller writes the record file)."""
        try:
            written = os.fstat(fd)  # nothing writes to it after this: its mtime is final
            if written.st_size != remote.size:
                raise FatalFailure(f"{remote.where}: wrote {written.st_size} bytes, expected "
                                   f"{remote.size}")
            if self._settings.verify_checksums:
                verify(transfer, remote, fd, digests, inline, combined, self._cancel)
            mtime_ns = written.st_mtime_ns
            attached = self._manifest.attach(fd, transfer.target, entry_for(mtime_ns))
            if self._settings.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp.name, transfer.target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if self._settings.fsync:
            fsync_dir(dir_fd)
        return mtime_ns, attached

    def close(self) -> None:
        """At the end of the run: the directories kept open for the next file."""
        self._dirs.close()

    def discard(self, fd: int, temp: Path, dir_fd: int, journal: ResumeJournal | None) -> None:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp.name, dir_fd=dir_fd)
        if journal is not None:
            journal.remove()


def _unwritable(target: Path, exc: OSError) -> FatalFailure:
    """A directory we may not write to; a process out of descriptors is not that, and goes up
    as the ``OSError`` it is, for the handler's one line naming the open-files limit."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        raise exc
    return FatalFailure(f"{target.parent}: cannot write there ({exc.strerror}); artifacts need "
                        "a writable directory")


class _LastDirectories:
    """The directory each thread opened last, kept open for that thread's next file.

    Opening a target's directory one component at a time takes a system call per component
    and one to close each, about 5 per file here: a fifth of a small file's, each releasing and
    taking back the GIL. A run's single-part files go one after another on each thread, mostly
    into one directory. Each caller gets a duplicate, which it closes as before; at most one
    descriptor per thread stays open, until ``close`` at the end of the run. Like the per-file
    descriptor it replaces, it names the directory that was reached without symlinks, whatever
    happens to the path meanwhile (a multi-part file already holds its directory that long).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[int, tuple[tuple[Path, Path], int]] = {}
        self._closed = False

    def open(self, root: Path, directory: Path) -> int:
        thread = threading.get_ident()
        with self._lock:
            key, fd = self._last.get(thread, (None, -1))
            if key == (root, directory):
                return os.dup(fd)
        opened = open_dir(root, directory, create=True)
        try:
            duplicate = os.dup(opened)
        except BaseException:
            os.close(opened)
            raise
        with self._lock:
            if self._closed:  # a thread the run left behind: keep nothing
                stale = opened
            else:
                _, stale = self._last.get(thread, (None, -1))
                self._last[thread] = ((root, directory), opened)
        if stale >= 0:
            os.close(stale)
        return duplicate

    def close(self) -> None:
        with self._lock:
            last, self._last, self._closed = self._last, {}, True
        for _, fd in last.values():
            os.close(fd)
