"""A pool of I/O threads (up to the connection budget) that runs work in priority order.

``ThreadPoolExecutor`` runs work first-in first-out, so a file whose parts are queued behind a
large file's parts waits for them: its first byte (and any error it would raise) comes late.
Ordering parts by (round, size) lets every file start early and keeps all connections busy.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .lanes import LaneLimit

T = TypeVar("T")

Priority = tuple[int, ...]


def _settle(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``fn`` and give its result or exception to ``future``, which is running."""
    try:
        result = fn(*args)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


class PriorityPool:
    def __init__(self, workers: int, name: str = "lazy-loading") -> None:
        self._workers = workers
        self._name = name
        self._queue: queue.PriorityQueue[tuple[Priority, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        # One token per thread waiting for work, taken by the work that will wake it (as in
        # ``ThreadPoolExecutor``): a count read beside the queue's size misjudged a thread
        # between its ``get`` and the count, and left a part queued with no thread for it.
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._closed = False

    def start(self, threads: int | None = None) -> None:
        """Spawn ``threads`` workers (all by default) now, while the GIL is free: a thread
        started while others run Python code waits up to a switch interval (5 ms) just to
        begin. The rest start only when work finds no thread idle: threads take work in turn,
        and each one that reads a part fills a buffer of up to 4 MiB of its own (``s3io``).
        With all 32 started for the 4 to 16 GETs a store that keeps up gets, SeaweedFS's 1 GiB
        (its server on the same 2 cores) took 1.273 s against 1.247 s (medians of 11)."""
        wanted = self._workers if threads is None else min(threads, self._workers)
        with self._lock:
            while len(self._threads) < wanted:
                self._spawn()
                self._idle.release()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, daemon=True,
                                  name=f"{self._name}-{len(self._threads)}")
        self._threads.append(thread)
        thread.start()

    def submit(self, priority: Priority, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("pool is shut down")
            self._queue.put((priority, next(self._seq), (future, fn, args)))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._workers:
                self._spawn()
        return future

    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                _settle(future, fn, args)
            del future, fn, args, item  # nothing of the last job outlives it in an idle thread
            self._idle.release()

    def shutdown(self, wait: bool = True) -> None:
        """Cancel queued work, stop the threads; ``wait`` joins them (running work finishes)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                _, _, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in threads:
            self._queue.put(((1 << 62,), next(self._seq), None))
        if wait:
            for thread in threads:
                thread.join()


class Throttle:
    """Jobs that enter ``pool`` at most ``limit.allowed`` at a time, in priority order; the
    rest wait here, holding no thread. Parts take every connection only while the process has
    the CPU to read them: on 2 cores, 16 × 32 MiB over loopback took 0.31 s on 16 connections
    and 0.26 s on 4, and a mixed set 0.37 against 0.31 s, while a distant store needs them all.
    ``progress`` feeds the limit the bytes read, and lets waiting jobs in when it rises."""

    def __init__(self, pool: PriorityPool, limit: LaneLimit) -> None:
        self._pool, self._limit = pool, limit
        self._lock = threading.Lock()
        self._waiting: list[tuple[Priority, int, Future[Any], Callable[..., Any],
                                  tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._running = 0
        self._allowed = limit.allowed
        limit.occupancy = self._occupancy

    def _occupancy(self) -> tuple[int, bool]:
        return self._running, bool(self._waiting)

    def submit(self, priority: Priority, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            heapq.heappush(self._waiting, (priority, next(self._seq), future, fn, args))
        self._admit()
        return future

    def progress(self, amount: int) -> None:
        allowed = self._limit.job_done(amount)
        if allowed != self._allowed:
            self._allowed = allowed
            self._admit()

    def _admit(self) -> None:
        while True:
            with self._lock:
                if self._running >= self._limit.allowed or not self._waiting:
                    return
                priority, _, future, fn, args = heapq.heappop(self._waiting)
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                self._running += 1
            try:
                self._pool.submit(priority, self._run, future, fn, args).add_done_callback(
                    functools.partial(self._unless_run, future))
            except BaseException as exc:  # the pool is shut down
                self._ended()
                future.set_exception(exc)

    def _run(self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            _settle(future, fn, args)
        finally:
            self._ended()

    def _unless_run(self, future: Future[Any], entered: Future[None]) -> None:
        if entered.cancelled():  # dropped from the pool's queue by its shutdown
            self._ended()
            future.set_exception(RuntimeError("pool is shut down"))

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
        self._admit()
