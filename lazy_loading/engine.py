"""The transfer engine: HEAD everything, plan, then fetch ranges of all files in parallel under
one connection budget, verify, publish atomically and record what was published.

Scheduling lives here (asyncio on the caller's loop); blocking S3 and file I/O runs in a thread
pool sized to the connection budget, created per run so nothing survives into a forked child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from .cache import (
    Manifest,
    ManifestEntry,
    ResumeJournal,
    remove_stale_temps,
    stale_temp_names,
    target_lock,
    temp_path,
)
from .checksums import DigestSet, combinable, combine_parts
from .client import S3ClientFactory, describe_endpoint
from .dirfd import UnsafePath, fsync_dir, open_dir
from .errors import DownloadError
from .plan import FileTransfer, choose_part_size, order_for_transfer, split_ranges
from .progress import DownloadState, ProgressTracker, format_bytes
from .revalidate import head_without_client
from .s3io import (
    ByteRange,
    Cancelled,
    FatalFailure,
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

logger = logging.getLogger("lazy_loading")

T = TypeVar("T")

_BACKOFF_BASE = 0.2
_BACKOFF_CAP = 8.0
_RETRY_AFTER_CAP = 60.0
_CONNECT_ATTEMPTS = 3
_HASH_READ = 4 * 1024 * 1024
_LOCK_WAIT_LOG_EVERY = 10.0


@dataclass(frozen=True)
class FileResult:
    """How one artifact became present."""

    display: str
    target: Path
    size: int
    etag: str
    status: str  # "fetched" | "resumed" | "cached" | "offline"
    seconds: float
    bytes_fetched: int

    def as_dict(self) -> dict[str, object]:
        return {"path": self.display, "size": self.size, "etag": self.etag,
                "status": self.status, "seconds": round(self.seconds, 3),
                "bytes_fetched": self.bytes_fetched}


class _FileFailed(Exception):
    def __init__(self, transfer: FileTransfer, reason: str) -> None:
        super().__init__(reason)
        self.transfer, self.reason = transfer, reason


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff (AWS architecture blog), attempt counted from 1."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** attempt))


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
        self._sinks: set[RangeSink] = set()
        self._pool: PriorityPool | None = None
        self._unreachable = False
        self._part_size = 0

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
            offline = self._offline_results(failures)
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
        await self._to_thread(self._check_free_space, transfers)
        self._tracker.start(len(transfers), sum(t.size for t in transfers))
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
            await self._to_thread(self._clients.get, repository)
        results = await asyncio.gather(
            *(self._in_pool((-1, t.index), self._head, t) for t in self._transfers),
            return_exceptions=True,
        )
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
        return self._with_retries(
            lambda: head_object(client, describe_endpoint(repo), repo.bucket_name,
                                transfer.spec.remote_path),
            self._cancel,
        )

    async def _all_cached(self) -> list[FileResult] | None:
        """Warm start: every file is published and intact, so one HEAD each, sent without a
        boto3 client or the I/O pool, settles it when nothing changed in the store."""
        if not all(self._published(t, remote=None) for t in self._transfers):
            return None
        remotes = await self._to_thread(head_without_client, self._transfers, self._clients,
                                        self._settings)
        if remotes is None:
            return None
        self._tracker.start(len(remotes), sum(r.size for r in remotes))
        results = []
        for transfer, remote in zip(self._transfers, remotes, strict=True):
            transfer.remote = remote
            result = self._cached(transfer, remote)
            if result is None:  # replaced on disk meanwhile: the normal path re-checks under lock
                return None
            results.append(result)
        return results

    def _offline_results(self, failures: dict[str, str]) -> list[FileResult] | None:
        """S3 unreachable but every file intact from an earlier run: serve the local copies."""
        if not self._unreachable:
            return None
        results = []
        for t in self._transfers:
            entry = self._published(t, remote=None)
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

    # ----------------------------------------------------------------- retries
    def _with_retries(self, call: Callable[[], T], cancel: threading.Event,
                      on_retry: Callable[[], None] | None = None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except TransientFailure as exc:
                limit = _CONNECT_ATTEMPTS if exc.connect_failure else self._settings.max_attempts
                if attempt >= limit or cancel.is_set():
                    raise
                delay = _backoff(attempt)
                if exc.retry_after is not None:  # the store knows best when to come back
                    delay = max(delay, min(exc.retry_after, _RETRY_AFTER_CAP))
                self._tracker.retry()
                logger.warning("%s (attempt %d/%d), retrying in %.1f s",
                               exc.message, attempt, limit, delay)
                if on_retry is not None:
                    on_retry()
                if cancel.wait(delay):
                    raise Cancelled() from None

    # ----------------------------------------------------------------- one file
    async def _materialize(self, transfer: FileTransfer) -> FileResult:
        lock = target_lock(self._state_dir, transfer.target)
        await self._acquire(lock, transfer)
        try:
            for attempt in range(2):
                remote = transfer.remote
                assert remote is not None
                cached = self._cached(transfer, remote)
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

    async def _acquire(self, lock: FileLock, transfer: FileTransfer) -> None:
        """Poll a non-blocking lock so waiting never holds a thread or blocks the loop."""
        started = last_log = time.monotonic()
        delay = 0.01
        while True:
            try:
                lock.acquire(timeout=0)
                return
            except Timeout:
                pass
            now = time.monotonic()
            if now - last_log >= _LOCK_WAIT_LOG_EVERY:
                last_log = now
                logger.info("waiting %.0f s for another process fetching %s",
                            now - started, transfer.display)
            await asyncio.sleep(delay)
            delay = min(0.25, delay * 2)

    def _published(self, transfer: FileTransfer,
                   remote: RemoteObject | None) -> ManifestEntry | None:
        """The manifest entry of a local copy that can be used as is: intact on disk, checked
        against the config's sha256 and, when ``remote`` is known, still the store's version."""
        entry = self._manifest.lookup(transfer.target)
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

    def _cached(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult | None:
        if self._published(transfer, remote) is None:
            return None
        self._tracker.file_done(skipped_bytes=remote.size)
        logger.info("cached %s (%s), unchanged in the store",
                    transfer.display, format_bytes(remote.size))
        return FileResult(transfer.display, transfer.target, remote.size, remote.etag, "cached",
                          0.0, 0)

    async def _download(self, transfer: FileTransfer, remote: RemoteObject) -> FileResult:
        started = time.monotonic()
        target = transfer.target
        part_size = self._part_size
        # An empty object still gets one GET: a HEAD saying 0 bytes is a known proxy bug, and
        # trusting it would publish an empty file over a good one.
        ranges = split_ranges(remote.size, part_size) or [ByteRange(0, 0, -1)]
        multipart = len(ranges) > 1
        temp = temp_path(target)
        journal, fd, dir_fd = await self._to_thread_settled(self._prepare, transfer, remote,
                                                            part_size, multipart, temp)
        resumed = set(journal.done) if journal is not None else set()
        logger.info("fetching %s (%s) from %s", transfer.display, format_bytes(remote.size),
                    remote.where)
        digests = self._digests(transfer, remote)
        sink = RangeSink(fd, self._tracker.add_bytes, threading.Event(),
                         digests if digests and not multipart else None)
        # A multi-part file checks its CRC from per-part values computed while each part's bytes
        # are hot, combined at the end: no second read of the file.
        part_algorithm = (remote.checksum[0] if multipart and remote.checksum is not None
                          and self._settings.verify_checksums and combinable(remote.checksum[0])
                          else None)
        part_crcs: dict[int, int] = dict(journal.crcs) if journal is not None else {}
        prefix = (_PrefixHasher(fd, ranges, digests, resumed, sink.cancel)
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
            client = self._clients.get(transfer.repository)
            await self._run_parts(client, remote, todo, not multipart, sink, journal,
                                  part_algorithm, part_crcs, prefix)
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
            mtime_ns = await self._to_thread_settled(self._finish, transfer, remote, owned, temp,
                                                     dir_fd, digests, hashed, combined)
        except BaseException:
            await self._to_thread_settled(self._discard, fd, temp, dir_fd, journal)
            raise
        finally:
            self._sinks.discard(sink)
            os.close(dir_fd)
        seconds = time.monotonic() - started
        fetched = sum(r.length for r in todo)
        entry = ManifestEntry(
            endpoint=remote.endpoint, bucket=remote.bucket, key=remote.key, etag=remote.etag,
            size=remote.size, mtime_ns=mtime_ns, version_id=remote.version_id,
            checksum=remote.checksum, sha256=transfer.spec.sha256, published_at=time.time(),
        )
        await self._to_thread_settled(self._manifest.record, target, entry, self._settings.fsync)
        if journal is not None:
            journal.remove()
        self._tracker.file_done()
        rate = fetched / seconds / (1024 * 1024) if seconds > 0 else 0.0
        logger.info("fetched %s (%s) in %.2f s, %.1f MiB/s",
                    transfer.display, format_bytes(remote.size), seconds, rate)
        return FileResult(transfer.display, target, remote.size, remote.etag,
                          "resumed" if resumed else "fetched", seconds, fetched)

    async def _run_parts(self, client: Any, remote: RemoteObject, todo: list[ByteRange],
                         whole: bool, sink: RangeSink, journal: ResumeJournal | None,
                         part_algorithm: str | None, part_crcs: dict[int, int],
                         prefix: _PrefixHasher | None) -> None:
        """Fetch the ranges in the shared pool; on any failure stop this file's other parts and
        wait until no thread can still write to its descriptor."""
        assert self._pool is not None
        futures = [
            self._pool.submit((r.index, -remote.size), self._fetch_part, client, remote, r, whole,
                              sink, journal, part_algorithm, part_crcs, prefix)
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

    def _digests(self, transfer: FileTransfer, remote: RemoteObject) -> DigestSet:
        """The checksums to verify: S3's full-object checksum and the config's sha256."""
        algorithms: list[str] = []
        if self._settings.verify_checksums:
            if remote.checksum is not None:
                algorithms.append(remote.checksum[0])
            if transfer.spec.sha256:
                algorithms.append("sha256")
        return DigestSet(algorithms)

    # ----------------------------------------------------------------- blocking steps
    def _prepare(self, transfer: FileTransfer, remote: RemoteObject, part_size: int,
                 multipart: bool, temp: Path) -> tuple[ResumeJournal | None, int, int]:
        """Under the target lock: open the target's directory without following symlinks,
        adopt a dead attempt's journal, sweep debris, create the temp file in that directory.
        Returns the journal, the temp file's descriptor and the directory's."""
        target = transfer.target
        try:
            dir_fd = open_dir(transfer.root, target.parent, create=True)
        except UnsafePath as exc:
            raise FatalFailure(f"{target}: {exc.strerror}; refusing to write there") from None
        except OSError as exc:
            raise FatalFailure(
                f"{target.parent}: cannot write there ({exc.strerror}); artifacts need a "
                "writable directory"
            ) from None
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
            journal = (ResumeJournal.resume(self._state_dir, target, remote, part_size)
                       if multipart else None)
            remove_stale_temps(self._state_dir, target)
            for stale in stale_temp_names(target, dir_fd):
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
        except OSError as exc:
            raise FatalFailure(
                f"{target.parent}: cannot write there ({exc.strerror}); artifacts need a "
                "writable directory"
            ) from None
        try:
            if journal is None and remote.size:
                try:
                    os.posix_fallocate(fd, 0, remote.size)
                except OSError as exc:
                    if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: fall back to a sparse file
                        raise
                    os.ftruncate(fd, remote.size)
            if multipart and journal is None:
                journal = ResumeJournal(self._state_dir, target, remote, part_size, temp)
                journal.start()
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp.name, dir_fd=dir_fd)
            raise FatalFailure(f"{target}: cannot create the download file: {exc.strerror}") from None
        return journal, fd

    def _fetch_part(self, client: Any, remote: RemoteObject, byte_range: ByteRange, whole: bool,
                    sink: RangeSink, journal: ResumeJournal | None, part_algorithm: str | None,
                    part_crcs: dict[int, int], prefix: _PrefixHasher | None = None) -> None:
        written = [0]

        def count(n: int) -> None:
            written[0] += n
            sink.on_bytes(n)

        part_digest = DigestSet([part_algorithm]) if part_algorithm else None
        part_sink = sink.with_counter(count, part_digest)

        def undo() -> None:
            sink.on_bytes(-written[0])
            written[0] = 0
            for digest in (sink.digests, part_digest):
                if digest is not None:
                    digest.reset()

        if sink.cancel.is_set():
            raise Cancelled()
        self._with_retries(lambda: fetch_range(client, remote, byte_range, whole, part_sink),
                           sink.cancel, on_retry=undo)
        crc = part_digest.value(part_algorithm) if part_digest and part_algorithm else None
        if crc is not None:
            part_crcs[byte_range.index] = crc
        if journal is not None:
            journal.mark_done(byte_range.index, crc)
        if prefix is not None:
            prefix.part_done(byte_range.index)

    def _finish(self, transfer: FileTransfer, remote: RemoteObject, fd: int, temp: Path,
                dir_fd: int, digests: DigestSet, inline: bool, combined: str | None) -> int:
        """Verify, optionally fsync, and atomically rename the temp file onto the target, both
        named in the directory open as ``dir_fd``. Returns the published file's mtime."""
        try:
            size = os.fstat(fd).st_size
            if size != remote.size:
                raise FatalFailure(f"{remote.where}: wrote {size} bytes, expected {remote.size}")
            if self._settings.verify_checksums:
                self._verify(transfer, remote, fd, digests, inline, combined)
            if self._settings.fsync:
                os.fsync(fd)
            mtime_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        os.replace(temp.name, transfer.target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if self._settings.fsync:
            fsync_dir(dir_fd)
        return mtime_ns

    def _verify(self, transfer: FileTransfer, remote: RemoteObject, fd: int,
                digests: DigestSet, inline: bool, combined: str | None) -> None:
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
                _hash_fd(fd, remote.size, digests, self._cancel)
            computed = {a: digests.encoded(a) for a in digests.algorithms}
        for algorithm, got in computed.items():
            if got != expected[algorithm]:
                source = f"files[{transfer.index}].sha256" if algorithm == "sha256" else algorithm
                raise FatalFailure(f"{remote.where}: {source} mismatch: expected "
                                   f"{expected[algorithm]}, downloaded {got}")

    def _discard(self, fd: int, temp: Path, dir_fd: int, journal: ResumeJournal | None) -> None:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp.name, dir_fd=dir_fd)
        if journal is not None:
            journal.remove()

    def _check_free_space(self, transfers: list[FileTransfer]) -> None:
        """Refuse to start when a filesystem cannot hold what must be fetched."""
        needed: dict[int, tuple[Path, int]] = {}
        for t in transfers:
            if t.remote is not None and self._published(t, t.remote) is not None:
                continue
            anchor = t.target.parent
            while not anchor.exists():
                anchor = anchor.parent
            dev = anchor.stat().st_dev
            path, total = needed.get(dev, (anchor, 0))
            needed[dev] = (path, total + t.size)
        for path, total in needed.values():
            free = shutil.disk_usage(path).free
            if total > free:
                raise DownloadError(
                    f"not enough free disk space on {path}: the artifacts need "
                    f"{format_bytes(total)}, {format_bytes(free)} is free"
                )

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


class _PrefixHasher:
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
                    _hash_fd(self._fd, part.length, self._digests, self._cancel, part.start)
                    with self._state:
                        self._next += 1
            finally:
                self._hashing.release()


def _hash_fd(fd: int, size: int, digests: DigestSet, cancel: threading.Event,
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
