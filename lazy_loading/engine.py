"""The transfer engine: HEAD everything, plan, then fetch ranges of all files in parallel under
one connection budget; each file is then verified (``verify``), published atomically
(``publish``) and recorded in the manifest. ``local`` decides when a copy on disk will do,
``retry`` when a request is worth sending again.

Scheduling lives here (asyncio on the caller's loop); blocking S3 and file I/O runs in a thread
pool sized to the connection budget, created per run so nothing survives into a forked child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, TypeVar

from .cache import (
    Manifest,
    ManifestEntry,
    ResumeJournal,
    TargetLock,
    target_lock,
    temp_path,
)
from .checksums import DigestSet, combinable, combine_parts
from .client import S3ClientFactory, describe_endpoint
from .errors import DownloadError
from .local import LocalCopies
from .plan import FileTransfer, choose_part_size, order_for_transfer, split_ranges
from .progress import DownloadState, ProgressTracker, format_bytes
from .publish import Publisher
from .results import FileResult
from .retry import Retrier
from .revalidate import SignedRequests, head_without_client
from .s3io import (
    ByteRange,
    Cancelled,
    ObjectChanged,
    RangeSink,
    RemoteObject,
    TransferFailure,
    TransientFailure,
    fetch_range,
    head_object,
)
from .scheduler import PriorityPool
from .settings import LazyLoadingSettings
from .verify import PrefixHasher, digests_for, part_check_algorithm

logger = logging.getLogger("lazy_loading")

T = TypeVar("T")

_LOCK_WAIT_LOG_EVERY = 10.0
AUTO_TIMEOUT_BASE = 120.0
AUTO_TIMEOUT_RATE = 1024 * 1024  # bytes per second, all connections together

__all__ = ["FileResult", "TransferEngine"]


class _FileFailed(Exception):
    def __init__(self, transfer: FileTransfer, reason: str) -> None:
        super().__init__(reason)
        self.transfer, self.reason = transfer, reason


class TransferEngine:
    def __init__(self, transfers: list[FileTransfer], clients: S3ClientFactory,
                 settings: LazyLoadingSettings, state_dir: Path, tracker: ProgressTracker) -> None:
        self._transfers = transfers
        self._clients = clients
        self._settings = settings
        self._state_dir = state_dir
        self._manifest = Manifest(state_dir)
        self._tracker = tracker
        self._cancel = threading.Event()
        self._local = LocalCopies(self._manifest, tracker)
        self._publisher = Publisher(state_dir, settings, self._cancel)
        self._retrier = Retrier(settings, tracker)
        self._sinks: set[RangeSink] = set()
        self._pool: PriorityPool | None = None
        self._unreachable = False
        self._part_size = 0
        self._signed: SignedRequests | None = None
        self.started = time.monotonic()
        self.deadline = self.started + (settings.timeout or AUTO_TIMEOUT_BASE)

    # ----------------------------------------------------------------- orchestration
    async def run(self) -> list[FileResult]:
        self._tracker.set_state(DownloadState.PLANNING)
        cached = await self._all_cached()
        if cached is not None:
            return cached
        self._pool = PriorityPool(self._settings.max_connections)
        self._pool.start()
        pool = self._pool
        try:
            results = await self._run()
        except BaseException:
            self._cancel_all()
            pool.shutdown(wait=False)
            raise
        finally:
            self._pool = None
            if self._signed is not None:
                self._signed.close()
        # Join the idle threads so none is alive if the caller forks next (gunicorn master).
        await self._to_thread(pool.shutdown, True)
        return results

    def _cancel_all(self) -> None:
        self._cancel.set()
        for sink in list(self._sinks):
            sink.abort()

    async def _run(self) -> list[FileResult]:
        failures = await self._head_all()
        if failures:
            offline = (self._local.offline_results(self._transfers, failures)
                       if self._unreachable else None)
            if offline is not None:
                return offline
            raise DownloadError(
                f"cannot download {len(failures)} of {len(self._transfers)} lazy-loading files",
                failures,
            )
        transfers = order_for_transfer(self._transfers)
        # From every file's size, not just the missing ones: a resumed run must cut the same
        # parts as the run it resumes.
        self._part_size = choose_part_size(sum(t.size for t in transfers),
                                           self._settings.max_connections,
                                           self._settings.part_size)
        await self._to_thread(self._local.check_free_space, transfers, self._needs_no_room)
        total = sum(t.size for t in transfers)
        if self._settings.timeout is None:
            self.deadline = self.started + AUTO_TIMEOUT_BASE + total / AUTO_TIMEOUT_RATE
        self._tracker.start(len(transfers), total)
        ticker = asyncio.ensure_future(self._log_progress())
        # Each file in flight holds a lock, a temp file and a journal open: bound them by the
        # connection budget, not by the number of files.
        in_flight = asyncio.Semaphore(2 * self._settings.max_connections)

        async def bounded(transfer: FileTransfer) -> FileResult:
            async with in_flight:
                return await self._materialize(transfer)

        tasks = [asyncio.ensure_future(bounded(t)) for t in transfers]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.done() and not t.cancelled() and t.exception() for t in tasks):
                self._cancel_all()
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
        except BaseException:
            self._cancel_all()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.wait(tasks))
            raise
        finally:
            ticker.cancel()
        errors = {
            t.transfer.display: t.reason
            for task in tasks
            if not task.cancelled() and isinstance((t := task.exception()), _FileFailed)
        }
        unexpected = [e for task in tasks if not task.cancelled()
                      and (e := task.exception()) is not None and not isinstance(e, _FileFailed)]
        if unexpected:
            raise unexpected[0]
        if errors:
            raise DownloadError(f"failed to download {len(errors)} lazy-loading file(s)", errors)
        return [task.result() for task in tasks]

    def deadline_passed(self) -> str:
        """What to say when ``deadline`` has passed. With LAZY_LOADING_TIMEOUT=auto it is a
        budget for the HEADs, then one that grows with the bytes to fetch, so a store that
        never finishes cannot hang a server's start forever."""
        if self._settings.timeout is not None:
            return f"lazy loading gave up after LAZY_LOADING_TIMEOUT={self._settings.timeout:g} s"
        return (f"lazy loading gave up after {time.monotonic() - self.started:.0f} s "
                f"(LAZY_LOADING_TIMEOUT=auto: {AUTO_TIMEOUT_BASE:g} s plus 1 s per MiB to fetch; "
                "set LAZY_LOADING_TIMEOUT in seconds to change it); the store is too slow or not "
                "answering")

    def _needs_no_room(self, transfer: FileTransfer) -> bool:
        """A killed run left this file's preallocated temp file and journal to adopt, or the
        file itself is already there, unrecorded, waiting to be verified."""
        assert transfer.remote is not None
        return self._unrecorded_candidate(transfer) or ResumeJournal.resume(
            self._state_dir, transfer.target, transfer.remote, self._part_size,
            part_check_algorithm(transfer.remote, self._settings)) is not None

    def _unrecorded_candidate(self, transfer: FileTransfer) -> bool:
        remote = transfer.remote
        return (remote is not None and bool(digests_for(transfer, remote, self._settings))
                and self._manifest.lookup(transfer.target) is None
                and self._local.same_size_file(transfer.target, remote.size))

    def _adopt_unrecorded(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult | None:
        """A file the manifest does not know (its record was lost to a full disk, or a copy
        placed by hand) is kept when it verifies against the object's checksum or the config's
        sha256: one read instead of a download, and no free space needed."""
        digests = digests_for(transfer, remote, self._settings)
        mtime_ns = self._local.verified_copy(transfer, remote, digests, self._cancel)
        if mtime_ns is None:
            return None
        self._record(transfer, self._entry(transfer, remote, mtime_ns))
        self._tracker.file_done(skipped_bytes=remote.size)
        logger.info("kept %s (%s): already here and verified against the store's checksum",
                    transfer.display, format_bytes(remote.size))
        return FileResult(transfer.display, transfer.target, remote.size, remote.etag, "cached",
                          0.0, 0)

    @staticmethod
    def _entry(transfer: FileTransfer, remote: RemoteObject, mtime_ns: int) -> ManifestEntry:
        return ManifestEntry(
            endpoint=remote.endpoint, bucket=remote.bucket, key=remote.key, etag=remote.etag,
            size=remote.size, mtime_ns=mtime_ns, version_id=remote.version_id,
            checksum=remote.checksum, sha256=transfer.spec.sha256, published_at=time.time(),
        )

    def _record(self, transfer: FileTransfer, entry: ManifestEntry) -> None:
        """The file is published and verified either way; a record lost to a full disk only
        means the next start verifies the file again instead of trusting it."""
        try:
            self._manifest.record(transfer.target, entry, self._settings.fsync)
        except OSError as exc:
            logger.warning("%s is published and verified, but its record could not be "
                           "written (%s); the next start checks it again",
                           transfer.display, exc.strerror)

    async def _to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """For steps that leave nothing on disk: a cancelled task may abandon the thread."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _to_thread_settled(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a step that creates, writes or removes files to completion even when the task is
        cancelled meanwhile, then deliver the cancellation at the next await. An abandoned
        thread would leave its temp file or descriptor with no one to clean it up."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        interrupted = False
        try:
            while True:
                try:
                    return await asyncio.shield(future)
                except asyncio.CancelledError:
                    if future.cancelled():
                        raise
                    interrupted = True
        finally:
            if interrupted and (task := asyncio.current_task()) is not None:
                if hasattr(task, "uncancel"):  # Python 3.11+: keep the cancel count balanced
                    task.uncancel()
                task.cancel()

    async def _in_pool(self, priority: tuple[int, ...], fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return await asyncio.wrap_future(self._pool.submit(priority, fn, *args))

    # ----------------------------------------------------------------- HEAD
    async def _head_all(self) -> dict[str, str]:
        # Build each client before the first request: construction takes ~60 ms of GIL, and
        # every I/O thread would otherwise queue behind it on the factory's lock.
        repositories = {t.repository.repository_id: t.repository for t in self._transfers}
        for repository in repositories.values():
            if repository.endpoint_url is None:  # custom endpoints need no client unless asked
                await self._to_thread(self._clients.get, repository)
        # A warm start that found a change already knows every object. Otherwise signed HEADs
        # without botocore's pipeline come first; whatever they cannot settle (an error status,
        # a refused connection) goes through the client, with its retries and messages.
        quick = self._signed = SignedRequests(self._transfers, self._clients, self._settings)
        results: list[RemoteObject | BaseException | None] = [t.remote for t in self._transfers]
        unknown = [i for i, found in enumerate(results) if found is None]
        answers = await asyncio.gather(
            *(self._in_pool((-1, i), quick.head, self._transfers[i]) for i in unknown))
        for i, found in zip(unknown, answers, strict=True):
            results[i] = found
        retry = [i for i, found in enumerate(results) if found is None]
        slow = await asyncio.gather(
            *(self._in_pool((-1, i), self._head, self._transfers[i]) for i in retry),
            return_exceptions=True,
        )
        for i, outcome in zip(retry, slow, strict=True):
            results[i] = outcome
        failures: dict[str, str] = {}
        self._unreachable = True
        for transfer, result in zip(self._transfers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, TransferFailure):
                    raise result
                failures[transfer.display] = result.message
                if not isinstance(result, TransientFailure):
                    self._unreachable = False
                continue
            assert result is not None  # every None was asked again
            transfer.remote = result
            expected = transfer.spec.size
            if expected is not None and expected != result.size:
                self._unreachable = False
                failures[transfer.display] = (
                    f"files[{transfer.index}].size is {expected} but {result.where} has "
                    f"{result.size} bytes"
                )
        return failures

    def _head(self, transfer: FileTransfer) -> RemoteObject:
        repo = transfer.repository
        client = self._clients.get(repo)
        return self._retrier.call(
            lambda: head_object(client, describe_endpoint(repo), repo.bucket_name,
                                transfer.spec.remote_path),
            self._cancel,
        )

    async def _all_cached(self) -> list[FileResult] | None:
        """Warm start: every file is published and intact, so one HEAD each, sent without a
        boto3 client or the I/O pool, settles it when nothing changed in the store."""
        if not all(self._local.published(t, remote=None) for t in self._transfers):
            return None
        remotes = await self._to_thread(head_without_client, self._transfers, self._clients,
                                        self._settings)
        if remotes is None:
            return None
        for transfer, remote in zip(self._transfers, remotes, strict=True):
            transfer.remote = remote  # kept for the normal path if anything changed
        self._tracker.start(len(remotes), sum(r.size for r in remotes))
        results = []
        for transfer, remote in zip(self._transfers, remotes, strict=True):
            result = self._local.cached(transfer, remote)
            if result is None:  # replaced on disk meanwhile: the normal path re-checks under lock
                return None
            results.append(result)
        return results

    # ----------------------------------------------------------------- one file
    async def _materialize(self, transfer: FileTransfer) -> FileResult:
        lock = target_lock(self._state_dir, transfer.target)
        await self._acquire(lock, transfer)
        try:
            for attempt in range(2):
                remote = transfer.remote
                assert remote is not None
                cached = self._local.cached(transfer, remote)
                if cached is None and self._unrecorded_candidate(transfer):
                    cached = await self._to_thread(self._adopt_unrecorded, transfer, remote)
                if cached is not None:
                    return cached
                try:
                    return await self._download(transfer, remote)
                except ObjectChanged as exc:
                    if attempt == 1:
                        raise _FileFailed(transfer, f"{exc.message}; changed again after restart") from None
                    logger.warning("%s; restarting the file", exc.message)
                    try:
                        transfer.remote = await self._in_pool((-1, transfer.index), self._head, transfer)
                    except TransferFailure as head_exc:
                        raise _FileFailed(transfer, head_exc.message) from None
                except TransferFailure as exc:
                    raise _FileFailed(transfer, exc.message) from None
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
        started = time.monotonic()
        target = transfer.target
        part_size = self._part_size
        # An empty object still gets one GET: a HEAD saying 0 bytes is a known proxy bug, and
        # trusting it would publish an empty file over a good one.
        ranges = split_ranges(remote.size, part_size) or [ByteRange(0, 0, -1)]
        multipart = len(ranges) > 1
        temp = temp_path(target)
        journal, fd, dir_fd = await self._to_thread_settled(self._publisher.prepare, transfer, remote,
                                                            part_size, multipart, temp)
        resumed = set(journal.done) if journal is not None else set()
        logger.info("fetching %s (%s) from %s", transfer.display, format_bytes(remote.size),
                    remote.where)
        digests = digests_for(transfer, remote, self._settings)
        sink = RangeSink(fd, self._tracker.add_bytes, threading.Event(),
                         digests if digests and not multipart else None,
                         min_rate=self._settings.min_rate,
                         rate_window=self._settings.rate_window)
        # A multi-part file checks its CRC from per-part values computed while each part's bytes
        # are hot, combined at the end: no second read of the file.
        part_algorithm = (remote.checksum[0] if multipart and remote.checksum is not None
                          and self._settings.verify_checksums and combinable(remote.checksum[0])
                          else None)
        check_algorithm = part_check_algorithm(remote, self._settings) if multipart else None
        part_crcs: dict[int, int] = dict(journal.crcs) if journal is not None else {}
        prefix = (PrefixHasher(fd, ranges, digests, resumed, sink.cancel)
                  if multipart and digests and not (part_algorithm
                                                   and digests.algorithms == [part_algorithm])
                  else None)
        self._sinks.add(sink)
        if self._cancel.is_set():
            sink.abort()
        try:
            resumed_bytes = sum(r.length for r in ranges if r.index in resumed)
            if resumed_bytes:
                self._tracker.add_bytes(resumed_bytes)
                logger.info("resuming %s, %s already present",
                            transfer.display, format_bytes(resumed_bytes))
            todo = [r for r in ranges if r.index not in resumed]
            signed = self._signed.session_for(transfer.repository) if self._signed else None
            client = None if signed is not None else self._clients.get(transfer.repository)
            await self._run_parts(client, signed, remote, todo, not multipart, sink, journal,
                                  check_algorithm, part_crcs, prefix)
            combined = (combine_parts(part_algorithm, [(part_crcs[r.index], r.length)
                                                       for r in ranges])
                        if part_algorithm and all(r.index in part_crcs for r in ranges)
                        else None)
            hashed = not multipart or (prefix is not None and prefix.complete)
            if sink.unproven and not digests:
                logger.warning(
                    "%s: the store sent neither ETag nor Last-Modified with %d of %d ranges and "
                    "the object has no checksum, so nothing proves they all come from one "
                    "version; set files[%d].sha256 to verify it", remote.where,
                    len(sink.unproven), len(ranges), transfer.index)
            owned, fd = fd, -1  # _finish closes it whatever happens: never closed twice
            mtime_ns = await self._to_thread_settled(self._publisher.finish, transfer, remote, owned, temp,
                                                     dir_fd, digests, hashed, combined)
        except BaseException:
            await self._to_thread_settled(self._publisher.discard, fd, temp, dir_fd, journal)
            raise
        finally:
            self._sinks.discard(sink)
            os.close(dir_fd)
        seconds = time.monotonic() - started
        fetched = sum(r.length for r in todo)
        await self._to_thread_settled(self._record, transfer,
                                      self._entry(transfer, remote, mtime_ns))
        if journal is not None:
            journal.remove()
        self._tracker.file_done()
        rate = fetched / seconds / (1024 * 1024) if seconds > 0 else 0.0
        logger.info("fetched %s (%s) in %.2f s, %.1f MiB/s",
                    transfer.display, format_bytes(remote.size), seconds, rate)
        return FileResult(transfer.display, target, remote.size, remote.etag,
                          "resumed" if resumed else "fetched", seconds, fetched)

    async def _run_parts(self, client: Any, signed: Any, remote: RemoteObject,
                         todo: list[ByteRange],
                         whole: bool, sink: RangeSink, journal: ResumeJournal | None,
                         check_algorithm: str | None, part_crcs: dict[int, int],
                         prefix: PrefixHasher | None) -> None:
        """Fetch the ranges in the shared pool; on any failure stop this file's other parts and
        wait until no thread can still write to its descriptor."""
        assert self._pool is not None
        futures = [
            self._pool.submit((r.index, -remote.size), self._fetch_part, client, signed, remote, r,
                              whole, sink, journal, check_algorithm, part_crcs, prefix)
            for r in todo
        ]
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except BaseException:
            sink.abort()
            for future in futures:
                future.cancel()
            await self._to_thread_settled(wait_futures, futures)
            raise

    # ----------------------------------------------------------------- blocking steps
    def _fetch_part(self, client: Any, signed: Any, remote: RemoteObject, byte_range: ByteRange,
                    whole: bool, sink: RangeSink, journal: ResumeJournal | None,
                    check_algorithm: str | None, part_crcs: dict[int, int],
                    prefix: PrefixHasher | None = None) -> None:
        written = [0]

        def count(n: int) -> None:
            written[0] += n
            sink.on_bytes(n)

        part_digest = DigestSet([check_algorithm]) if check_algorithm else None
        part_sink = sink.with_counter(count, part_digest)

        def undo() -> None:
            sink.on_bytes(-written[0])
            written[0] = 0
            for digest in (sink.digests, part_digest):
                if digest is not None:
                    digest.reset()

        if sink.cancel.is_set():
            raise Cancelled()
        self._retrier.call(lambda: fetch_range(client, remote, byte_range, whole, part_sink,
                                               signed),
                           sink.cancel, on_retry=undo)
        crc = part_digest.value(check_algorithm) if part_digest and check_algorithm else None
        if crc is not None:
            part_crcs[byte_range.index] = crc
        if journal is not None:
            if self._settings.fsync:  # the part's bytes reach the disk before its record does
                os.fdatasync(sink.fd)
            journal.mark_done(byte_range.index, crc)
        if prefix is not None:
            prefix.part_done(byte_range.index)

    async def _log_progress(self) -> None:
        interval = self._settings.progress_interval
        while True:
            await asyncio.sleep(interval)
            s = self._tracker.snapshot()
            eta = f", ETA {s.eta:.0f} s" if s.eta else ""
            logger.info(
                "%s of %s (%.0f%%) at %s/s%s, %d/%d files",
                format_bytes(s.bytes_done), format_bytes(s.bytes_total), s.fraction * 100,
                format_bytes(s.rate), eta, s.files_done, s.files_total,
            )


