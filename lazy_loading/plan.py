"""Pure planning: which files, in what order, split into which byte ranges. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import LazyLoadingFile, LazyLoadingRepository
from .s3io import ByteRange, RemoteObject
from .settings import MiB


@dataclass
class FileTransfer:
    """One artifact to make present: its spec, where it goes and, after HEAD, what it is."""

    index: int
    spec: LazyLoadingFile
    repository: LazyLoadingRepository
    target: Path
    root: Path  # the code dir or allowed root the target must stay in
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


_AUTO_MIN_PART = 4 * MiB
_AUTO_MAX_PART = 64 * MiB
_ROUNDS = 2


def choose_part_size(total_bytes: int, max_connections: int, configured: int | None) -> int:
    """One part size for a whole run: a configured size as is, otherwise about two parts per
    connection over all the bytes to fetch, within 4–64 MiB.

    Fewer, larger parts save per-request CPU (a botocore request costs ~1 ms of GIL on 2 cores);
    two rounds per connection keep every connection busy to the end, so no lone last part
    makes a long tail. A lone 32 MiB file still gets 8 parts, a 1 GiB one 32, 20 GB 320.
    """
    if configured is not None:
        return configured
    wanted = -(-total_bytes // (_ROUNDS * max_connections))
    wanted = -(-wanted // MiB) * MiB
    return max(_AUTO_MIN_PART, min(_AUTO_MAX_PART, wanted))


def order_for_transfer(transfers: list[FileTransfer]) -> list[FileTransfer]:
    """Largest first: the long pole starts at once, small files fill the gaps at the end."""
    return sorted(transfers, key=lambda t: (-t.size, t.index))


_MAX_FILES_PER_HOP = 16


def group_for_threads(transfers: list[FileTransfer], part_size: int,
                      connections: int) -> list[list[FileTransfer]]:
    """Files in the order given, single-part ones in groups that one I/O thread takes one after
    another: a hop between the event loop and a thread costs more GIL time than a small file's
    request. Groups stay small enough that every connection gets about two of them, so no
    thread is left with a long queue at the end. Larger files go alone (their parts spread)."""
    def single(transfer: FileTransfer) -> bool:
        return transfer.remote is not None and transfer.remote.size <= part_size

    per_group = max(1, min(_MAX_FILES_PER_HOP,
                           sum(map(single, transfers)) // (_ROUNDS * connections)))
    groups: list[list[FileTransfer]] = []
    for transfer in transfers:
        if groups and single(transfer) and single(groups[-1][0]) and len(groups[-1]) < per_group:
            groups[-1].append(transfer)
        else:
            groups.append([transfer])
    return groups
