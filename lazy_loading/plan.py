"""Pure planning: which files, in what order, split into which byte ranges. No I/O here."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
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

# Parts are cut, and lanes start, for at most this many connections. From a store that keeps
# up, the process's CPU is the limit well before it (on 2 cores GETs settle on 4 to 8), and
# parts cut for more connections only add requests: 16 × 32 MiB took 0.33 s cut for 32 and
# 0.22 s whole. A budget above it is taken only on trial while the process waits for the store
# (``lanes.LaneLimit.granted``), which pays where the store caps each connection; the GETs
# beyond 16 then share the same parts.
PLANNED_CONNECTIONS = 16


def choose_part_size(sizes: Sequence[int], max_connections: int, configured: int | None) -> int:
    """One part size for a whole run: a configured size as is, otherwise about two parts per
    connection (up to ``PLANNED_CONNECTIONS``) over all the bytes to fetch, within 4–64 MiB;
    but no file up to 64 MiB is split when the files alone keep the connections as evenly busy.

    Fewer, larger parts save per-request CPU (a botocore request costs ~1 ms of GIL on 2 cores);
    two rounds per connection keep every connection busy to the end, so no lone last part
    makes a long tail. A lone 32 MiB file still gets 8 parts, a 1 GiB one 32, 20 GB 320. But
    16 files of 32 MiB on 16 connections are already one round of equal jobs: cutting each in
    two only made them 16 several-part files, with a journal and a part schedule each (0.34 s
    against 0.28 s whole, on 2 cores).
    """
    if configured is not None:
        return configured
    max_connections = min(max_connections, PLANNED_CONNECTIONS)
    wanted = -(-sum(sizes) // (_ROUNDS * max_connections))
    wanted = -(-wanted // MiB) * MiB
    part = max(_AUTO_MIN_PART, min(_AUTO_MAX_PART, wanted))
    whole = max((size for size in sizes if size <= _AUTO_MAX_PART), default=0)
    whole = -(-whole // MiB) * MiB
    if whole > part and (_busiest_connection(sizes, whole, max_connections)
                         <= _busiest_connection(sizes, part, max_connections)):
        return whole
    return part


def _busiest_connection(sizes: Sequence[int], part_size: int, connections: int) -> int:
    """The bytes of the busiest connection when the parts are taken largest first by whichever
    connection is free, as the pool takes them (equal speeds assumed)."""
    loads = [0] * connections
    for length in sorted((min(part_size, size - start) for size in sizes
                          for start in range(0, size, part_size)), reverse=True):
        heapq.heapreplace(loads, loads[0] + length)
    return max(loads)


# From a nearby store, a GET should spend at most this share of its time waiting for its answer.
_WAIT_SHARE = 0.1


def parts_per_get(part_size: int, waited: float, seconds_per_byte: float) -> int:
    """How many consecutive parts one GET from a nearby store takes, given how long the last
    GET waited for its answer and how fast it read its body: enough that the wait is at most
    a tenth of the GET, up to 64 MiB.

    Parts are cut before any GET, for as many connections as a store capping each one needs.
    But from a store on this machine or next to it, the wait is no round trip: it is the
    server's own work per request, which every extra GET adds to. SeaweedFS, sharing our
    2 cores, answered 13 MiB parts after 10-70 ms and read them in 30-200 ms; its mixed tree
    took 0.53 s in 13 MiB GETs and 0.47 s in 52 MiB ones. A store capping each connection
    answers at once and reads slowly, and keeps its parts.
    """
    reading = seconds_per_byte * part_size
    if part_size <= 0 or waited <= _WAIT_SHARE * (waited + reading):
        return 1
    most = max(1, _AUTO_MAX_PART // part_size)
    reading_wanted = waited * (1 - _WAIT_SHARE) / _WAIT_SHARE
    if reading_wanted >= most * reading:
        return most
    return max(1, math.ceil(reading_wanted / reading))


def order_for_transfer(transfers: list[FileTransfer]) -> list[FileTransfer]:
    """Largest first: the long pole starts at once, small files fill the gaps at the end."""
    return sorted(transfers, key=lambda t: (-t.size, t.index))


def split_by_parts(transfers: list[FileTransfer], part_size: int
                   ) -> tuple[list[FileTransfer], list[FileTransfer]]:
    """(single-part files, files of several parts), each in the order given. A file not
    looked up yet counts as several: it goes the careful way, part by part."""
    single: list[FileTransfer] = []
    several: list[FileTransfer] = []
    for t in transfers:
        (single if t.remote is not None and t.remote.size <= part_size else several).append(t)
    return single, several
