"""Local copies: when a file already on disk can be used instead of fetching it.

A copy counts only when the manifest recorded publishing it, it is still the regular file we
published (size and mtime), it is the object the config names now (endpoint, bucket, key) and,
when known, still the store's version (ETag, size); with a ``sha256`` in the config, that too.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from .cache import Manifest, ManifestEntry
from .checksums import DigestSet
from .client import describe_endpoint
from .errors import DownloadError
from .plan import FileTransfer
from .progress import ProgressTracker, format_bytes
from .results import FileResult
from .s3io import FatalFailure, RemoteObject
from .verify import verify

logger = logging.getLogger("lazy_loading")


class LocalCopies:
    def __init__(self, manifest: Manifest, tracker: ProgressTracker) -> None:
        self._manifest = manifest
        self._tracker = tracker

    def published(self, transfer: FileTransfer, remote: RemoteObject | None,
                  read: ManifestEntry | None = None) -> ManifestEntry | None:
        """The manifest entry of a local copy that can be used as is: intact on disk, checked
        against the config's sha256 and, when ``remote`` is known, still the store's version.
        ``read``, the record as read moments ago, spares reading it again; every check is
        still made."""
        entry = read if read is not None else self._manifest.lookup(transfer.target)
        if entry is None or not entry.intact(transfer.target):
            return None
        repository = transfer.repository
        if (entry.endpoint, entry.bucket, entry.key) != (
                describe_endpoint(repository), repository.bucket_name, transfer.spec.remote_path):
            return None  # the config now names another object for this path
        if remote is not None and not entry.matches(remote):
            return None
        if transfer.spec.sha256 and entry.sha256 != transfer.spec.sha256:
            return None
        return entry

    def cached(self, transfer: FileTransfer, remote: RemoteObject,
               read: ManifestEntry | None = None) -> FileResult | None:
        """The local copy as a result, when it is the store's version (``read`` as for
        ``published``)."""
        if self.published(transfer, remote, read) is None:
            return None
        self._tracker.file_done(skipped_bytes=remote.size)
        logger.info("cached %s (%s), unchanged in the store",
                    transfer.display, format_bytes(remote.size))
        return FileResult(transfer.display, transfer.target, remote.size, remote.etag, "cached",
                          0.0, 0)

    def offline_results(self, transfers: list[FileTransfer],
                        failures: dict[str, str]) -> list[FileResult] | None:
        """S3 unreachable but every file intact from an earlier run: serve the local copies."""
        results = []
        for t in transfers:
            entry = self.published(t, remote=None)
            if entry is None:
                logger.error("the store is unreachable and %s has no intact local copy of "
                             "s3://%s/%s at %s", t.display, t.repository.bucket_name,
                             t.spec.remote_path, describe_endpoint(t.repository))
                return None
            results.append(FileResult(t.display, t.target, entry.size, entry.etag, "offline",
                                      0.0, 0))
        logger.warning(
            "the store is unreachable (%s); using %d intact local copies from an "
            "earlier download", next(iter(failures.values())), len(results)
        )
        return results

    def check_free_space(self, transfers: list[FileTransfer],
                         allocated: Callable[[FileTransfer], bool]) -> None:
        """Refuse to start when a filesystem cannot hold what must be fetched. A file whose
        temp file is ``allocated`` already (a killed run's, to be resumed) needs no more room:
        counting it again would refuse every restart on a volume under twice the size."""
        needed: dict[int, tuple[Path, int]] = {}
        devices: dict[Path, tuple[int, Path]] = {}  # many files share a few directories
        for t in transfers:
            if t.remote is not None and self.published(t, t.remote) is not None:
                continue
            if allocated(t):
                continue
            parent = t.target.parent
            if parent not in devices:
                anchor = parent
                while not anchor.exists():
                    anchor = anchor.parent
                devices[parent] = (anchor.stat().st_dev, anchor)
            dev, anchor = devices[parent]
            path, total = needed.get(dev, (anchor, 0))
            needed[dev] = (path, total + t.size)
        for path, total in needed.values():
            # What ``shutil.disk_usage`` reads, without importing it (with bz2 and lzma): 2 ms
            # of every start.
            usage = os.statvfs(path)
            if usage.f_blocks == 0:
                continue  # a filesystem with no size to report (ramfs, some FUSE) has no limit
            free = usage.f_bavail * usage.f_frsize
            if total > free:
                raise DownloadError(
                    f"not enough free disk space on {path}: the artifacts need "
                    f"{format_bytes(total)}, {format_bytes(free)} is free"
                )

    @staticmethod
    def same_size_file(target: Path, size: int) -> bool:
        try:
            st = os.lstat(target)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    @staticmethod
    def verified_copy(transfer: FileTransfer, remote: RemoteObject, digests: DigestSet,
                      cancel: threading.Event) -> int | None:
        """The mtime of the file at the target when it is the object (every digest matches)."""
        try:
            fd = os.open(transfer.target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != remote.size:
                return None
            verify(transfer, remote, fd, digests, inline=False, combined=None, cancel=cancel)
            return st.st_mtime_ns
        except (FatalFailure, OSError):
            return None
        finally:
            os.close(fd)
