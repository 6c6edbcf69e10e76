"""The transfer engine: HEAD everything (``lookup``), plan one part size, then make every file
present (``fetch``) in parallel under one connection budget, and give up as a whole.

Scheduling lives here (asyncio on the caller's loop); blocking S3 and file I/O runs in a thread
pool sized to the connection budget, created per run so nothing survives into a forked child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

from .aio import to_thread
from .cache import Manifest
from .client import S3ClientFactory
from .errors import DownloadError
from .fetch import FileFailed, FileFetcher
from .lanes import ConnectionLimit, LaneLimit
from .local import LocalCopies
from .lookup import RemoteLookup
from .plan import (
    PLANNED_CONNECTIONS,
    FileTransfer,
    choose_part_size,
    order_for_transfer,
    split_by_parts,
)
from .progress import DownloadState, ProgressTracker, format_bytes
from .results import FileResult
from .retry import Retrier
from .scheduler import PriorityPool, Throttle
from .settings import LazyLoadingSettings

logger = logging.getLogger("lazy_loading")

AUTO_TIMEOUT_BASE = 120.0
AUTO_TIMEOUT_RATE = 1024 * 1024  # bytes per second, all connections together

__all__ = ["FileResult", "TransferEngine"]


class TransferEngine:
    def __init__(self, transfers: list[FileTransfer], clients: S3ClientFactory,
                 settings: LazyLoadingSettings, state_dir: Path, tracker: ProgressTracker) -> None:
        self._transfers = transfers
        self._settings = settings
        self._tracker = tracker
        self._cancel = threading.Event()
        manifest = Manifest(state_dir)
        self._local = LocalCopies(manifest, tracker)
        retrier = Retrier(settings, tracker)
        self._lookup = RemoteLookup(transfers, clients, settings, retrier, self._local, tracker,
                                    self._cancel)
        self._fetcher = FileFetcher(state_dir, settings, clients, manifest, self._local, tracker,
                                    retrier, self._lookup, self._cancel)
        self.started = time.monotonic()
        self.deadline = self.started + (settings.timeout or AUTO_TIMEOUT_BASE)

    async def run(self) -> list[FileResult]:
        self._tracker.set_state(DownloadState.PLANNING)
        cached = await self._lookup.all_cached()
        if cached is not None:
            return cached
        pool = self._fetcher.pool = PriorityPool(self._settings.max_connections)
        pool.start(PLANNED_CONNECTIONS)
        try:
            results = await self._run()
        except BaseException:
            self._cancel_all()
            pool.shutdown(wait=False)
            self._fetcher.close()
            raise
        finally:
            self._fetcher.pool = self._fetcher.gets = None
            self._lookup.close()
        # Join the idle threads so none is alive if the caller forks next (gunicorn master).
        await to_thread(pool.shutdown, True)
        self._fetcher.close()
        return results

    def _cancel_all(self) -> None:
        self._cancel.set()
        self._fetcher.abort_all()

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

    async def _run(self) -> list[FileResult]:
        lanes = LaneLimit(self._settings.max_connections, starts_at=PLANNED_CONNECTIONS,
                          granted=PLANNED_CONNECTIONS)
        failures = await self._lookup.head_all(self._fetcher.submit, lanes)
        if failures:
            offline = (self._local.offline_results(self._transfers, failures)
                       if self._lookup.unreachable else None)
            if offline is not None:
                return offline
            raise DownloadError(
                f"cannot download {len(failures)} of {len(self._transfers)} lazy-loading files",
                failures,
            )
        transfers = order_for_transfer(self._transfers)
        total = sum(t.size for t in transfers)
        # From every file's size, not just the missing ones: a resumed run must cut the same
        # parts as the run it resumes.
        self._fetcher.part_size = choose_part_size([t.size for t in transfers],
                                                   self._settings.max_connections,
                                                   self._settings.part_size)
        await to_thread(self._local.check_free_space, transfers, self._fetcher.needs_no_room)
        if self._settings.timeout is None:
            self.deadline = self.started + AUTO_TIMEOUT_BASE + total / AUTO_TIMEOUT_RATE
        self._tracker.start(len(transfers), total)
        ticker = asyncio.ensure_future(self._log_progress())
        # Each file in flight holds a lock, a temp file and a journal open: bound them by the
        # connection budget, not by the number of files. Single-part files are bound by their
        # lanes, one file each.
        in_flight = asyncio.Semaphore(2 * self._settings.max_connections)
        single, several = split_by_parts(transfers, self._fetcher.part_size)
        assert self._fetcher.pool is not None
        # GETs start on a few connections and take more while the process has CPU to spare.
        limit = ConnectionLimit.for_store(self._settings.max_connections, self._lookup.nearby,
                                          granted=PLANNED_CONNECTIONS)
        logger.debug("GETs start on %d of %d connections", limit.allowed, limit.most)
        self._fetcher.gets = Throttle(self._fetcher.pool, limit)
        groups = [[transfer] for transfer in several] + ([single] if single else [])
        tasks = [asyncio.ensure_future(self._file(transfer, in_flight)) for transfer in several]
        if single:
            lanes.next_stage()
            tasks.append(asyncio.ensure_future(
                self._fetcher.make_present_single_part(single, lanes)))
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
            if not task.cancelled() and isinstance((t := task.exception()), FileFailed)
        }
        unexpected = [e for task in tasks if not task.cancelled()
                      and (e := task.exception()) is not None and not isinstance(e, FileFailed)]
        if unexpected:
            raise unexpected[0]
        if errors:
            raise DownloadError(f"failed to download {len(errors)} lazy-loading file(s)", errors)
        # Fetched largest first, reported in the config's order: callers pair them by position.
        done = {transfer.index: result for group, task in zip(groups, tasks, strict=True)
                for transfer, result in zip(group, task.result(), strict=True)}
        return [done[transfer.index] for transfer in self._transfers]

    async def _file(self, transfer: FileTransfer, in_flight: asyncio.Semaphore
                    ) -> list[FileResult]:
        async with in_flight:
            return [await self._fetcher.make_present(transfer)]

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
