"""Progress accounting: thread-safe counters, snapshots, and subscriber callbacks (no prints)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger("lazy_loading")


class DownloadState(str, Enum):
    IDLE = "idle"
    PLANNING = "planning"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class ProgressSnapshot:
    """What a readiness probe or progress bar needs, at one instant."""

    state: DownloadState
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    rate: float
    eta: float | None
    elapsed: float
    error: str | None = None
    retries: int = 0

    @property
    def fraction(self) -> float:
        return 1.0 if self.bytes_total == 0 else min(1.0, self.bytes_done / self.bytes_total)

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate_bytes_per_second": round(self.rate, 1),
            "eta_seconds": None if self.eta is None else round(self.eta, 1),
            "elapsed_seconds": round(self.elapsed, 3),
            "retries": self.retries,
            "error": self.error,
        }


ProgressCallback = Callable[[ProgressSnapshot], None]

_RATE_WINDOW = 5.0
_NOTIFY_EVERY = 0.25


class ProgressTracker:
    """Counts bytes and files from many worker threads; notifies subscribers at most 4 times a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[ProgressCallback] = []
        self._reset()

    def _reset(self) -> None:
        self._state = DownloadState.IDLE
        self._files_total = self._files_done = 0
        self._bytes_total = self._bytes_done = 0
        self._started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque()
        self._last_notify = 0.0
        self._error: str | None = None
        self._retries = 0

    def subscribe(self, callback: ProgressCallback) -> None:
        self._subscribers.append(callback)

    def start(self, files_total: int, bytes_total: int) -> None:
        with self._lock:
            self._reset()
            self._state = DownloadState.DOWNLOADING
            self._files_total, self._bytes_total = files_total, bytes_total
        self._notify(force=True)

    def set_state(self, state: DownloadState, error: str | None = None) -> None:
        with self._lock:
            self._state, self._error = state, error
        self._notify(force=True)

    def add_bytes(self, count: int) -> None:
        with self._lock:
            self._bytes_done += count
        self._notify(force=False)

    def retry(self) -> None:
        with self._lock:
            self._retries += 1

    def file_done(self, skipped_bytes: int = 0) -> None:
        """A file finished; ``skipped_bytes`` counts bytes satisfied from cache or resume."""
        with self._lock:
            self._files_done += 1
            self._bytes_done += skipped_bytes
        self._notify(force=True)

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            now = time.monotonic()
            self._samples.append((now, self._bytes_done))
            while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW:
                self._samples.popleft()
            t0, b0 = self._samples[0]
            rate = (self._bytes_done - b0) / (now - t0) if now - t0 > 0.05 else 0.0
            remaining = max(0, self._bytes_total - self._bytes_done)
            eta = remaining / rate if rate > 0 else None
            return ProgressSnapshot(
                state=self._state,
                files_done=self._files_done,
                files_total=self._files_total,
                bytes_done=self._bytes_done,
                bytes_total=self._bytes_total,
                rate=rate,
                eta=0.0 if remaining == 0 else eta,
                elapsed=now - self._started,
                error=self._error,
                retries=self._retries,
            )

    def _notify(self, force: bool) -> None:
        if not self._subscribers:
            return
        now = time.monotonic()
        if not force and now - self._last_notify < _NOTIFY_EVERY:
            return
        self._last_notify = now
        snap = self.snapshot()
        for callback in self._subscribers:
            try:
                callback(snap)
            except Exception:
                logger.exception("progress callback failed")


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
