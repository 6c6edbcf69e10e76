"""Verification: which digests an object has, computing them, and comparing them.

Single-part files are hashed inline as their one body streams in; multi-part files combine
per-part CRCs (no second read) or hash their parts in order while they are in the page cache
(``PrefixHasher``); anything else is read back once.
"""

from __future__ import annotations

import os
import threading

from .checksums import DigestSet, combinable
from .plan import FileTransfer
from .s3io import ByteRange, Cancelled, FatalFailure, RemoteObject
from .settings import LazyLoadingSettings

_HASH_READ = 4 * 1024 * 1024


def digests_for(transfer: FileTransfer, remote: RemoteObject,
                settings: LazyLoadingSettings) -> DigestSet:
    """The checksums to verify: S3's full-object checksum and the config's sha256."""
    algorithms: list[str] = []
    if settings.verify_checksums:
        if remote.checksum is not None:
            algorithms.append(remote.checksum[0])
        if transfer.spec.sha256:
            algorithms.append("sha256")
    return DigestSet(algorithms)


def part_check_algorithm(remote: RemoteObject, settings: LazyLoadingSettings) -> str | None:
    """The CRC each part of a multi-part file is computed with as it streams in: the object's
    own, when its parts' CRCs combine into it. That verifies the file without reading it
    again, and, journaled with each part, lets a resumed run check what a killed or powered-off
    one left on disk. An object without one gets no part CRC: a resumed run trusts the parts
    journaled since the machine last started (the page cache holds their bytes whatever
    happened to the process) or synced (``LAZY_LOADING_FSYNC``), and fetches the others again
    (``ResumeJournal.parts_trusted``). A CRC32C of every part only for the journal cost about a
    sixth of a 16 × 32 MiB download, on every run, for the rare resume after a power cut."""
    if remote.checksum is not None and settings.verify_checksums and combinable(remote.checksum[0]):
        return remote.checksum[0]
    return None


def parts_failing_their_crc(fd: int, ranges: list[ByteRange], crcs: dict[int, int],
                            algorithm: str, cancel: threading.Event) -> set[int]:
    """Resumed parts whose bytes on disk do not match the CRC journaled for them."""
    bad = set()
    for part in ranges:
        expected = crcs.get(part.index)
        digest = DigestSet([algorithm])
        hash_fd(fd, part.length, digest, cancel, part.start)
        if expected is None or digest.value(algorithm) != expected:
            bad.add(part.index)
    return bad


def verify(transfer: FileTransfer, remote: RemoteObject, fd: int, digests: DigestSet,
           inline: bool, combined: str | None, cancel: threading.Event) -> None:
    """Compare digests. Multi-part files use their combined part CRCs when that is all there
    is to check; otherwise (a sha256 to check, no combinable CRC) they are read back once."""
    if not digests:
        return
    expected: dict[str, str] = {}
    if remote.checksum is not None:
        expected[remote.checksum[0]] = remote.checksum[1]
    if transfer.spec.sha256:
        expected["sha256"] = transfer.spec.sha256
    if not inline and combined is not None and remote.checksum is not None \
            and digests.algorithms == [remote.checksum[0]]:
        computed = {remote.checksum[0]: combined}
    else:
        if not inline:
            digests.reset()
            hash_fd(fd, remote.size, digests, cancel)
        computed = {a: digests.encoded(a) for a in digests.algorithms}
    for algorithm, got in computed.items():
        if got != expected[algorithm]:
            source = f"files[{transfer.index}].sha256" if algorithm == "sha256" else algorithm
            raise FatalFailure(f"{remote.where}: {source} mismatch: expected "
                               f"{expected[algorithm]}, downloaded {got}")


class PrefixHasher:
    """Hashes a multi-part file in order while its parts are still in the page cache.

    SHA digests cannot be combined from parts the way CRCs can. Instead, whenever a part
    finishes, the thread that finished it hashes every finished part that now continues the
    hashed prefix. One thread hashes at a time; the others go back to downloading. On a network
    that is slower than the CPU, the digest is ready when the last part lands, instead of after
    a second read of the whole file.
    """

    def __init__(self, fd: int, ranges: list[ByteRange], digests: DigestSet, done: set[int],
                 cancel: threading.Event) -> None:
        self._fd, self._ranges, self._digests, self._cancel = fd, ranges, digests, cancel
        self._done = set(done)
        self._next = 0
        self._state = threading.Lock()
        self._hashing = threading.Lock()
        digests.reset()

    @property
    def complete(self) -> bool:
        return self._next == len(self._ranges)

    def _ready(self) -> ByteRange | None:
        with self._state:
            if self._next < len(self._ranges) and self._next in self._done:
                return self._ranges[self._next]
            return None

    def part_done(self, index: int) -> None:
        with self._state:
            self._done.add(index)
        # Re-check after releasing: a part finished while we held the lock would otherwise wait
        # for the next part_done (or for the read-back at the end).
        while self._ready() is not None and self._hashing.acquire(blocking=False):
            try:
                while (part := self._ready()) is not None:
                    hash_fd(self._fd, part.length, self._digests, self._cancel, part.start)
                    with self._state:
                        self._next += 1
            finally:
                self._hashing.release()


def hash_fd(fd: int, size: int, digests: DigestSet, cancel: threading.Event,
             offset: int = 0) -> None:
    end = offset + size
    while offset < end:
        if cancel.is_set():
            raise Cancelled()
        chunk = os.pread(fd, min(_HASH_READ, end - offset), offset)
        if not chunk:
            break
        digests.update(chunk)
        offset += len(chunk)
