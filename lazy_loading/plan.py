"""Pure planning: which files, in what order, split into which byte ranges. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import LazyLoadingFile, LazyLoadingRepository
from .s3io import ByteRange, RemoteObject


@dataclass
class FileTransfer:
    """One artifact to make present: its spec, where it goes and, after HEAD, what it is."""

    index: int
    spec: LazyLoadingFile
    repository: LazyLoadingRepository
    target: Path
    display: str
    remote: RemoteObject | None = None

    @property
    def size(self) -> int:
        return self.remote.size if self.remote else 0


def split_ranges(size: int, part_size: int) -> list[ByteRange]:
    """Cut ``size`` bytes into inclusive ranges of ``part_size`` (the last one shorter)."""
    if size <= 0:
        return []
    return [
        ByteRange(index, start, min(start + part_size, size) - 1)
        for index, start in enumerate(range(0, size, part_size))
    ]


def effective_part_size(size: int, part_size: int, max_connections: int) -> int:
    """Shrink parts of a mid-sized lone file so idle connections can help, never below 4 MiB.

    A 32 MiB file at the default 16 MiB would use 2 of 16 connections; 8 parts of 4 MiB finish
    sooner. Large files keep the configured size to bound per-request overhead.
    """
    floor = min(part_size, 4 * 1024 * 1024)
    if size <= floor:
        return part_size
    wanted = -(-size // max_connections)
    return max(floor, min(part_size, wanted))


def order_for_transfer(transfers: list[FileTransfer]) -> list[FileTransfer]:
    """Largest first: the long pole starts at once, small files fill the gaps at the end."""
    return sorted(transfers, key=lambda t: (-t.size, t.index))
