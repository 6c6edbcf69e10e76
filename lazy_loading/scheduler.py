"""A fixed pool of I/O threads (the connection budget) that runs work in priority order.

``ThreadPoolExecutor`` runs work first-in first-out, so a file whose parts are queued behind a
large file's parts waits for them: its first byte (and any error it would raise) comes late.
Ordering parts by (round, size) lets every file start early and keeps all connections busy.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

Priority = tuple[int, ...]


class PriorityPool:
    def __init__(self, workers: int, name: str = "lazy-loading") -> None:
        self._workers = workers
        self._name = name
        self._queue: queue.PriorityQueue[tuple[Priority, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Spawn every worker now, while the GIL is free: a thread started while others run
        Python code waits up to a switch interval (5 ms) just to begin."""
        with self._lock:
            while len(self._threads) < self._workers:
                self._spawn()

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
            if len(self._threads) < self._workers:
                self._spawn()
        return future

    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

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
