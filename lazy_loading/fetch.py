"""One file's transfer: under the target's lock, keep the local copy or fetch the object's parts
into a temp file, then verify and publish it (``publish``) and record it in the manifest.

A file that fits in one part goes from lock to record on one I/O thread (``_whole_file``), and
single-part files are taken one after another by a few threads (``lanes``): for a small object,
each hop between the event loop and a thread cost more GIL time than its request. Larger files
spread their parts over the shared pool, in priority order; every GET enters it through the run's
``Throttle``, which gives it as many connections as the process can read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .aio import settled, to_thread, to_thread_settled
from .cache import Manifest, ManifestEntry, ResumeJournal, TargetLock, target_lock, temp_path
from .checksums import DigestSet, combine_parts
from .client import S3ClientFactory
from .lanes import LaneLimit, Lanes
from .local import LocalCopies
from .lookup import RemoteLookup
from .plan import FileTransfer, parts_per_get, split_ranges
from .progress import ProgressTracker, format_bytes
from .publish import Publisher
from .results import FileResult
from .retry import Retrier
from .s3io import (
    ByteRange,
    Cancelled,
    ObjectChanged,
    RangeSink,
    RemoteObject,
    TransferFailure,
    fetch_ranges,
)
from .scheduler import PriorityPool, Throttle
from .settings import LazyLoadingSettings
from .verify import PrefixHasher, digests_for, part_check_algorithm

logger = logging.getLogger("lazy_loading")

_LOCK_WAIT_LOG_EVERY = 10.0
_WEIGHED_GET = 1 << 20  # a shorter GET's timing is mostly the request's own work, not the store's

T = TypeVar("T")


class FileFailed(Exception):
    """A file that cannot be made present; the others go on until the run gives up."""

    def __init__(self, transfer: FileTransfer, reason: str) -> None:
        super().__init__(reason)
        self.transfer, self.reason = transfer, reason


@dataclass
class _TempFile:
    """A file between ``_open`` and ``_close``: its temp file, parts and checks."""

    transfer: FileTransfer
    remote: RemoteObject
    temp: Path
    journal: ResumeJournal | None
    fd: int
    dir_fd: int
    ranges: list[ByteRange]
    todo: list[ByteRange]
    digests: DigestSet
    sink: RangeSink
    part_algorithm: str | None  # each part's CRC, journaled and combined into the S3 CRC
    prefix: PrefixHasher | None
    started: float
    part_crcs: dict[int, int] = field(default_factory=dict)
    untaken: dict[int, ByteRange] = field(default_factory=dict)  # parts no GET has taken yet

    @property
    def multipart(self) -> bool:
        return len(self.ranges) > 1


class FileFetcher:
    def __init__(self, state_dir: Path, settings: LazyLoadingSettings, clients: S3ClientFactory,
                 manifest: Manifest, local: LocalCopies, tracker: ProgressTracker,
                 retrier: Retrier, lookup: RemoteLookup, cancel: threading.Event) -> None:
        self._state_dir = state_dir
        self._settings = settings
        self._clients = clients
        self._manifest = manifest
        self._local = local
        self._tracker = tracker
        self._retrier = retrier
        self._lookup = lookup
        self._cancel = cancel
        self._publisher = Publisher(state_dir, settings, manifest, cancel)
        self._sinks: set[RangeSink] = set()
        self._taking = threading.Lock()
        # How long the last GET of a MiB or more from a nearby store waited for its answer,
        # and how many seconds each byte of its body took: what ``parts_per_get`` weighs.
        self._last_get: tuple[float, float] | None = None
        self.part_size = 0  # one per run, set by the engine once every size is known
        self.pool: PriorityPool | None = None
        self.gets: Throttle | None = None  # the run's GETs (parts, lanes) enter the pool here

    def close(self) -> None:
        """At the end of the run, once its threads are done or abandoned."""
        self._publisher.close()

    def abort_all(self) -> None:
        """Close every body being read, so no thread waits for a stalled store."""
        for sink in list(self._sinks):
            sink.abort()

    # ----------------------------------------------------------------- what is already here
    def needs_no_room(self, transfer: FileTransfer) -> bool:
        """A killed run left this file's preallocated temp file and journal to adopt, or the
        file itself is already there, unrecorded, waiting to be verified."""
        assert transfer.remote is not None
        if self._unrecorded_candidate(transfer):
            return True
        # Only a file of several parts keeps a journal and a preallocated temp file.
        return transfer.remote.size > self.part_size and ResumeJournal.resume(
            self._state_dir, transfer.target, transfer.remote, self.part_size,
            part_check_algorithm(transfer.remote, self._settings)) is not None

    def _unrecorded_candidate(self, transfer: FileTransfer) -> bool:
        remote = transfer.remote
        return (remote is not None and bool(digests_for(transfer, remote, self._settings))
                and self._local.same_size_file(transfer.target, remote.size)
                and self._manifest.lookup(transfer.target) is None)

    def _adopt_unrecorded(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult | None:
        """A file the manifest does not know (its record was lost to a full disk, or a copy
        placed by hand) is kept when it verifies against the object's checksum or the config's
        sha256: one read instead of a download, and no free space needed."""
        digests = digests_for(transfer, remote, self._settings)
        mtime_ns = self._local.verified_copy(transfer, remote, digests, self._cancel)
        if mtime_ns is None:
            return None
        self._record(transfer, remote, mtime_ns)
        self._tracker.file_done(skipped_bytes=remote.size)
        logger.info("kept %s (%s): already here and verified against the store's checksum",
                    transfer.display, format_bytes(remote.size))
        return FileResult(transfer.display, transfer.target, remote.size, remote.etag, "cached",
                          0.0, 0)

    def _kept(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult | None:
        """The local copy when it will do: recorded and unchanged, or unrecorded and verified
        (blocking: the second may read the whole file)."""
        kept = self._local.cached(transfer, remote)
        if kept is None and self._unrecorded_candidate(transfer):
            kept = self._adopt_unrecorded(transfer, remote)
        return kept

    @staticmethod
    def _entry(transfer: FileTransfer, remote: RemoteObject, mtime_ns: int) -> ManifestEntry:
        return ManifestEntry(
            endpoint=remote.endpoint, bucket=remote.bucket, key=remote.key, etag=remote.etag,
            size=remote.size, mtime_ns=mtime_ns, version_id=remote.version_id,
            checksum=remote.checksum, sha256=transfer.spec.sha256, published_at=time.time(),
        )

    def _record(self, transfer: FileTransfer, remote: RemoteObject, mtime_ns: int) -> None:
        """The record file of a file published without its record attached. The file is
        published and verified either way; a record lost to a full disk only means the next
        start verifies the file again instead of trusting it."""
        try:
            self._manifest.record(transfer.target, self._entry(transfer, remote, mtime_ns),
                                  self._settings.fsync)
        except OSError as exc:
            logger.warning("%s is published and verified, but its record could not be "
                           "written (%s); the next start checks it again",
                           transfer.display, exc.strerror)

    async def make_present_single_part(self, transfers: list[FileTransfer], limit: LaneLimit
                                       ) -> list[FileResult]:
        """Single-part files, largest first: each from lock to record on one I/O thread, taken
        by lanes. A file another process is fetching, or that grew past one part, goes part by
        part. A file that fails stops the lanes: the run gives up as a whole anyway."""
        largest = transfers[0].size
        assert self.gets is not None, "the engine sets the throttle for the run"
        throttle = self.gets
        lanes = Lanes(transfers, self._whole_file, limit,
                      lambda lane: throttle.submit((0, -largest), lane), self._cancel)
        try:
            found = await settled(asyncio.wrap_future(lanes.start()))
        except Cancelled:
            raise asyncio.CancelledError() from None
        # Files another process holds wait for it side by side, not one after another.
        bound = asyncio.Semaphore(self._settings.max_connections)

        async def part_by_part(transfer: FileTransfer) -> FileResult:
            async with bound:
                return await self.make_present(transfer)

        left = iter(await asyncio.gather(*(part_by_part(transfer) for transfer, result
                                           in zip(transfers, found, strict=True)
                                           if result is None)))
        return [result if result is not None else next(left) for result in found]

    async def in_pool(self, priority: tuple[int, ...], fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the run's I/O pool (a cancelled caller may abandon it)."""
        return await asyncio.wrap_future(self.submit(priority, fn, *args))

    def submit(self, priority: tuple[int, ...], fn: Callable[..., T], *args: Any) -> Future[T]:
        assert self.pool is not None, "the engine sets the pool for the run"
        return self.pool.submit(priority, fn, *args)

    # ----------------------------------------------------------------- one file, one thread
    def _whole_file(self, transfer: FileTransfer) -> FileResult | None:
        """A single-part file from lock to record, blocking. None when another process holds
        its lock or the object grew past one part: ``make_present`` then takes over."""
        if self._cancel.is_set():
            raise Cancelled()
        lock = target_lock(self._state_dir, transfer.target)
        if not lock.try_acquire():
            return None
        try:
            for attempt in range(2):
                remote = transfer.remote
                assert remote is not None
                if remote.size > self.part_size:
                    return None
                kept = self._kept(transfer, remote)
                if kept is not None:
                    return kept
                try:
                    return self._download_here(transfer, remote)
                except ObjectChanged as exc:
                    self._changed(transfer, exc, attempt)
                    transfer.remote = self._head_again(transfer)
                except TransferFailure as exc:
                    raise FileFailed(transfer, exc.message) from None
            raise AssertionError("unreachable")
        finally:
            lock.release()

    def _download_here(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult:
        opened = self._open(transfer, remote)
        try:
            client, signed = self._transport(transfer)
            for byte_range in opened.todo:
                self._fetch_parts(opened, client, signed, [byte_range])
            return self._close(opened)
        except BaseException:
            self._abandon(opened)
            raise

    # ----------------------------------------------------------------- parts over the pool
    async def make_present(self, transfer: FileTransfer) -> FileResult:
        """A file from the local copy or the store, part by part over the pool."""
        lock = target_lock(self._state_dir, transfer.target)
        await self._acquire(lock, transfer)
        try:
            for attempt in range(2):
                remote = transfer.remote
                assert remote is not None
                kept = await to_thread(self._kept, transfer, remote)
                if kept is not None:
                    return kept
                try:
                    return await self._download(transfer, remote)
                except ObjectChanged as exc:
                    self._changed(transfer, exc, attempt)
                    transfer.remote = await self.in_pool((-1, transfer.index), self._head_again,
                                                         transfer)
                except TransferFailure as exc:
                    raise FileFailed(transfer, exc.message) from None
                except Cancelled:
                    raise asyncio.CancelledError() from None
            raise AssertionError("unreachable")
        finally:
            lock.release()

    async def _acquire(self, lock: TargetLock, transfer: FileTransfer) -> None:
        """Poll a non-blocking lock so waiting never holds a thread or blocks the loop."""
        started = last_log = time.monotonic()
        delay = 0.01
        while True:
            if lock.try_acquire():
                return
            now = time.monotonic()
            if now - last_log >= _LOCK_WAIT_LOG_EVERY:
                last_log = now
                logger.info("waiting %.0f s for another process fetching %s",
                            now - started, transfer.display)
            await asyncio.sleep(delay)
            delay = min(0.25, delay * 2)

    async def _download(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult:
        opened = await to_thread_settled(self._open, transfer, remote)
        try:
            await self._run_parts(opened)
        except BaseException:
            await to_thread_settled(self._abandon, opened)
            raise
        return await to_thread_settled(self._close, opened)

    async def _run_parts(self, opened: _TempFile) -> None:
        """Fetch the ranges in the shared pool; on any failure stop this file's other parts and
        wait until no thread can still write to its descriptor."""
        client, signed = self._transport(opened.transfer)
        assert self.gets is not None, "the engine sets the throttle for the run"
        with self._taking:
            opened.untaken = {r.index: r for r in opened.todo}
        futures = [self.gets.submit((r.index, -opened.remote.size), self._fetch_from, opened,
                                    client, signed, r)
                   for r in opened.todo]
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except BaseException:
            opened.sink.abort()
            for future in futures:
                future.cancel()
            await to_thread_settled(wait_futures, futures)
            with self._taking:
                opened.untaken.clear()
            raise

    def _fetch_from(self, opened: _TempFile, client: Any, signed: Any, first: ByteRange) -> None:
        """The GET queued for part ``first``: with the parts after it that no GET has taken,
        as many as ``parts_per_get`` allows; nothing when an earlier GET took ``first``.
        A configured part size is each GET's size, as set (a proxy's limit, say)."""
        taken = self._take(opened, first)
        if taken:
            self._fetch_parts(opened, client, signed, taken)

    def _take(self, opened: _TempFile, first: ByteRange) -> list[ByteRange]:
        last_get = self._last_get
        most = (parts_per_get(self.part_size, *last_get)
                if last_get is not None and self._settings.part_size is None else 1)
        with self._taking:
            if opened.untaken.pop(first.index, None) is None:
                return []
            taken = [first]
            while len(taken) < most:
                following = opened.untaken.pop(taken[-1].index + 1, None)
                if following is None:
                    break
                taken.append(following)
        return taken

    # ----------------------------------------------------------------- stages (blocking)
    def _changed(self, transfer: FileTransfer, exc: ObjectChanged, attempt: int) -> None:
        if attempt == 1:
            raise FileFailed(transfer, f"{exc.message}; changed again after restart") from None
        logger.warning("%s; restarting the file", exc.message)

    def _head_again(self, transfer: FileTransfer) -> RemoteObject:
        try:
            return self._lookup.head(transfer)
        except TransferFailure as exc:
            raise FileFailed(transfer, exc.message) from None

    def _transport(self, transfer: FileTransfer) -> tuple[Any, Any]:
        """The signed session for a custom endpoint, else the boto3 client."""
        signed = self._lookup.signed.session_for(transfer.repository) if self._lookup.signed else None
        return (None if signed is not None else self._clients.get(transfer.repository)), signed

    def _open(self, transfer: FileTransfer, remote: RemoteObject) -> _TempFile:
        """Under the lock: the temp file (or a dead attempt's, to resume), its parts and the
        checks to run on them."""
        started = time.monotonic()
        # An empty object still gets one GET: a HEAD saying 0 bytes is a known proxy bug, and
        # trusting it would publish an empty file over a good one.
        ranges = split_ranges(remote.size, self.part_size) or [ByteRange(0, 0, -1)]
        multipart = len(ranges) > 1
        temp = temp_path(transfer.target)
        journal, fd, dir_fd = self._publisher.prepare(transfer, remote, self.part_size, multipart,
                                                      temp)
        resumed = set(journal.done) if journal is not None else set()
        # A file of one part is done moments later and logged then: one line per small file.
        logger.log(logging.INFO if multipart else logging.DEBUG, "fetching %s (%s) from %s",
                   transfer.display, format_bytes(remote.size), remote.where)
        digests = digests_for(transfer, remote, self._settings)
        sink = RangeSink(fd, self._tracker.add_bytes, threading.Event(),
                         digests if digests and not multipart else None,
                         min_rate=self._settings.min_rate,
                         rate_window=self._settings.rate_window)
        # A multi-part file checks its CRC from per-part values computed while each part's bytes
        # are hot, combined at the end: no second read of the file.
        part_algorithm = part_check_algorithm(remote, self._settings) if multipart else None
        prefix = (PrefixHasher(fd, ranges, digests, resumed, sink.cancel)
                  if multipart and digests and not (part_algorithm
                                                   and digests.algorithms == [part_algorithm])
                  else None)
        opened = _TempFile(
            transfer, remote, temp, journal, fd, dir_fd, ranges,
            [r for r in ranges if r.index not in resumed], digests, sink, part_algorithm, prefix,
            started, dict(journal.crcs) if journal is not None else {})
        self._sinks.add(sink)
        if self._cancel.is_set():
            sink.abort()
        resumed_bytes = sum(r.length for r in ranges if r.index in resumed)
        if resumed_bytes:
            self._tracker.add_bytes(resumed_bytes)
            logger.info("resuming %s, %s already present",
                        transfer.display, format_bytes(resumed_bytes))
        return opened

    def _fetch_parts(self, opened: _TempFile, client: Any, signed: Any,
                     ranges: list[ByteRange]) -> None:
        """Consecutive parts, by one GET: each counted, CRC'd and journaled on its own as soon
        as its last byte is written, so a retry (or a later run) fetches only the rest."""
        sink, algorithm = opened.sink, opened.part_algorithm
        throttle = self.gets
        pieces: list[tuple[ByteRange, RangeSink, list[int], DigestSet | None]] = []
        for byte_range in ranges:
            written = [0]

            def count(n: int, written: list[int] = written) -> None:
                written[0] += n
                sink.on_bytes(n)
                if throttle is not None and n > 0:
                    throttle.progress(n)

            part_digest = DigestSet([algorithm]) if algorithm else None
            pieces.append((byte_range, sink.with_counter(count, part_digest), written,
                           part_digest))
        done = 0

        def piece_done() -> None:
            nonlocal done
            byte_range, _, _, part_digest = pieces[done]
            done += 1
            self._part_done(opened, byte_range, part_digest)

        def undo() -> None:  # the piece cut short: its bytes are fetched again
            _, _, written, part_digest = pieces[done]
            sink.on_bytes(-written[0])
            written[0] = 0
            for digest in (sink.digests, part_digest):
                if digest is not None:
                    digest.reset()

        if sink.cancel.is_set():
            raise Cancelled()
        waited, reading, length = self._retrier.call(lambda: fetch_ranges(
            client, opened.remote, [(r, piece_sink) for r, piece_sink, _, _ in pieces[done:]],
            not opened.multipart, signed, piece_done), sink.cancel, on_retry=undo)
        if length >= _WEIGHED_GET and self._lookup.nearby:
            self._last_get = (waited, reading / length)

    def _part_done(self, opened: _TempFile, byte_range: ByteRange,
                   part_digest: DigestSet | None) -> None:
        algorithm = opened.part_algorithm
        crc = part_digest.value(algorithm) if part_digest and algorithm else None
        if crc is not None:
            opened.part_crcs[byte_range.index] = crc
        if opened.journal is not None:
            if self._settings.fsync:  # the part's bytes reach the disk before its record does
                os.fdatasync(opened.sink.fd)
            opened.journal.mark_done(byte_range.index, crc)
        if opened.prefix is not None:
            opened.prefix.part_done(byte_range.index)

    def _close(self, opened: _TempFile) -> FileResult:
        """Every part is in: verify, publish, record."""
        transfer, remote, ranges = opened.transfer, opened.remote, opened.ranges
        try:
            combined = (combine_parts(opened.part_algorithm,
                                      [(opened.part_crcs[r.index], r.length) for r in ranges])
                        if opened.part_algorithm
                        and all(r.index in opened.part_crcs for r in ranges)
                        else None)
            hashed = not opened.multipart or (opened.prefix is not None
                                              and opened.prefix.complete)
            if opened.sink.unproven and not opened.digests:
                logger.warning(
                    "%s: the store sent neither ETag nor Last-Modified with %d of %d ranges and "
                    "the object has no checksum, so nothing proves they all come from one "
                    "version; set files[%d].sha256 to verify it", remote.where,
                    len(opened.sink.unproven), len(ranges), transfer.index)
            fd, opened.fd = opened.fd, -1  # finish closes it whatever happens: never twice
            mtime_ns, recorded = self._publisher.finish(
                transfer, remote, fd, opened.temp, opened.dir_fd, opened.digests, hashed,
                combined, functools.partial(self._entry, transfer, remote))
        except BaseException:
            self._abandon(opened)
            raise
        self._let_go(opened)
        seconds = time.monotonic() - opened.started
        fetched = sum(r.length for r in opened.todo)
        if not recorded:
            self._record(transfer, remote, mtime_ns)
        if opened.journal is not None:
            opened.journal.remove()
        self._tracker.file_done()
        rate = fetched / seconds / (1024 * 1024) if seconds > 0 else 0.0
        logger.info("fetched %s (%s) in %.2f s, %.1f MiB/s",
                    transfer.display, format_bytes(remote.size), seconds, rate)
        return FileResult(transfer.display, transfer.target, remote.size, remote.etag,
                          "resumed" if len(opened.todo) < len(ranges) else "fetched", seconds,
                          fetched)

    def _abandon(self, opened: _TempFile) -> None:
        """Remove the temp file (its journal too); keeps nothing half-written."""
        if opened.dir_fd < 0:
            return
        self._publisher.discard(opened.fd, opened.temp, opened.dir_fd, opened.journal)
        opened.fd = -1
        self._let_go(opened)

    def _let_go(self, opened: _TempFile) -> None:
        self._sinks.discard(opened.sink)
        if opened.dir_fd >= 0:
            os.close(opened.dir_fd)
            opened.dir_fd = -1
