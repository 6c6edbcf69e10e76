"""Quick jobs (HEADs, single-part files) taken one after another by a few pool threads, "lanes",
whose number follows what the process can use.

Each lane is one hop between the loop and a thread, not one per job: a hop costs more GIL time
than a small request. How many lanes run is ``LaneLimit``'s call. It starts high (16 of the
default 32 connections), which a distant or throttled store needs, and takes more only on
trial: 32 lanes cost 256 small files on SeaweedFS, whose server shares our cores, 3-8% in two
runs. Once the process keeps a whole core busy, the GIL is the bottleneck: then every extra
thread only adds hand-offs of it (on two cores, 256 small files took 0.47 s on 16 threads and
0.39 s on 4), so lanes are halved while the rate holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_WINDOW_JOBS = 16
_WINDOW_SECONDS = 0.02
_SATURATED = 0.9  # cores of CPU time per second of wall time: the GIL allows about one
_IDLE = 0.5
_KEEPS_RATE = 0.75
_GAINS_RATE = 1.25
_FEWEST = 4
_JOBS_PER_HOP = 8


class LaneLimit:
    """How many lanes may run, measured in windows of at least 16 jobs and 20 ms. It starts at
    ``starts_at`` (the budget by default).

    * The process used at least 0.9 of a core: halve the lanes (not below 4).
    * The window after a halving was more than a quarter slower: undo it, and halve no more.
    * The process used less than half a core, so the store is what it waits for: double the
      lanes, up to ``granted`` (the budget by default).
    * In between, or waiting beyond ``granted``: double them to see, and undo it for good
      unless the next window is at least a quarter faster.

    A job's ``amount`` (bytes, for parts) is what the rate counts.
    """

    _STARTS_AT: int | None = None  # the budget
    _BUSY_WINDOWS_TO_HALVE = 1
    _WINDOW_JOBS = _WINDOW_JOBS
    _WINDOW_SECONDS = _WINDOW_SECONDS

    def __init__(self, most: int, *, starts_at: int | None = None, granted: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.most = max(1, most)
        self.fewest = min(_FEWEST, self.most)
        self.granted = self.most if granted is None else max(1, min(self.most, granted))
        starts_at = starts_at or self._STARTS_AT
        self.allowed = self.most if starts_at is None else min(self.most, starts_at)
        self._clock, self._cpu = clock, cpu
        self._lock = threading.Lock()
        self._jobs = self._amount = 0
        self._start = (clock(), cpu())
        self._before_halving: tuple[int, float] | None = None  # (lanes, jobs per second)
        self._before_trying: tuple[int, float] | None = None
        self._settled = self._topped = False
        self._busy_windows = 0
        # How many jobs run and whether more wait, for a limit whose changes show only as jobs
        # end (``ConnectionLimit``); the throttle that applies it tells.
        self.occupancy: Callable[[], tuple[int, bool]] = lambda: (self.allowed, False)

    def next_stage(self) -> None:
        """The same store, other jobs (the GETs after the HEADs): start from the lanes found so
        far, and measure afresh."""
        with self._lock:
            self._jobs, self._amount, self._start = 0, 0, (self._clock(), self._cpu())
            self._before_halving = self._before_trying = None

    def job_done(self, amount: int = 1) -> int:
        """Count one finished job (``amount`` of work); returns how many lanes may run now."""
        with self._lock:
            self._jobs += 1
            self._amount += amount
            if self._jobs < self._WINDOW_JOBS:
                return self.allowed
            now, used = self._clock(), self._cpu()
            wall = now - self._start[0]
            if wall < self._WINDOW_SECONDS:
                return self.allowed
            busy = (used - self._start[1]) / wall
            rate = self._amount / wall
            self._jobs, self._amount, self._start = 0, 0, (now, used)
            self._adjust(busy, rate)
            return self.allowed

    def _in_effect(self) -> bool:
        """Whether the last change of ``allowed`` shows in the jobs running. A lane ends after
        its job, so for lanes it does at once."""
        return True

    def _adjust(self, busy: float, rate: float) -> None:
        pending = self._before_halving is not None or self._before_trying is not None
        if pending and not self._in_effect():
            return  # hold: judged on a window that measures the change
        halved, self._before_halving = self._before_halving, None
        tried, self._before_trying = self._before_trying, None
        self._busy_windows = self._busy_windows + 1 if busy >= _SATURATED else 0
        if halved is not None and rate < _KEEPS_RATE * halved[1]:
            self.allowed, self._settled = halved[0], True
        elif tried is not None and rate < _GAINS_RATE * tried[1]:
            self.allowed, self._topped = tried[0], True
        elif (self._busy_windows >= self._BUSY_WINDOWS_TO_HALVE and self.allowed > self.fewest
              and not self._settled):
            self._before_halving = (self.allowed, rate)
            self.allowed = max(self.fewest, self.allowed // 2)
        elif busy < _IDLE and self.allowed < self.granted:
            self.allowed = self._grown()
        elif busy < _SATURATED and self.allowed < self.most and not self._topped:
            self._before_trying = (self.allowed, rate)
            self.allowed = self._doubled()

    def _doubled(self) -> int:
        return min(self.most, self.allowed * 2)

    def _grown(self) -> int:
        """What a process waiting for the store gets."""
        return min(self.granted, self._doubled())


class ConnectionLimit(LaneLimit):
    """How many GETs may run (``scheduler.Throttle``), in windows of at least 16 reads and
    50 ms, its rate in bytes. Unlike lanes:

    * it starts at 8 (at 4 for a nearby store: ``for_store``), and goes down to 4: a process
      reading 4 connections over loopback on 2 cores already keeps a core busy, and every
      thread more only slows it (16 × 32 MiB took 0.31 s on 16 connections, 0.26 s on 4 or 8);
    * a process still waiting for the store takes ``granted`` connections at once (16, from
      the engine), since each of a real store's connections is capped: doubling cost a capped
      1 GiB a window at each step. Beyond that it doubles on trial: a process that waits
      cannot tell a store capping each connection (32 took a 40 MB/s-capped 1 GiB from
      1.78 to 1.20 s) from a server sharing its cores (SeaweedFS on loopback, slower on 32);
    * it halves only after two busy windows in a row, and its windows are longer: a store that
      sends in bursts (a proxy's rate cap) kept a core busy in one 20 ms window out of two;
    * a change is judged only once the GETs running match it (``_in_effect``).
    """

    _STARTS_AT = 8
    _BUSY_WINDOWS_TO_HALVE = 2
    _WINDOW_SECONDS = 0.05
    _effect_seen = False  # a pending change matched the GETs running at the last window's end

    def _in_effect(self) -> bool:
        """A GET runs to its end, so a halving shows only once enough of them have ended, and
        a doubling once the new ones send bytes: a change is judged on the first whole window
        after the jobs running (``occupancy``: how many, and whether more wait) matched it.
        Judged on the window right after it, a doubling on a store that caps each connection
        was undone for good before the new connections' first bytes (90 MB/s per connection:
        1 GiB in up to 1.7 s against 0.9 s on 16)."""
        running, waiting = self.occupancy()
        matched = running == self.allowed or (running < self.allowed and not waiting)
        if self._effect_seen:
            self._effect_seen = False
            return True
        self._effect_seen = matched
        return False

    def _grown(self) -> int:
        return self.granted

    @classmethod
    def for_store(cls, most: int, nearby: bool, granted: int | None = None) -> ConnectionLimit:
        """The limit for a store that is ``nearby`` (it answered a HEAD within a few
        milliseconds: on this machine or next to it) or not. No round trip caps a nearby
        store's connections, so the first window's reads go over 4, leaving the CPU to reading
        them (over loopback, 16 × 32 MiB 0.227 → 0.200 s, the mixed set 0.260 → 0.236 s, 1 GiB
        0.437 → 0.416 s). A distant store gets 8 at first: one capping each connection at
        90 MB/s, as S3 does, took 5-8% longer from 4."""
        return cls(most, starts_at=_FEWEST if nearby else cls._STARTS_AT, granted=granted)


class Lanes(Generic[T, R]):
    """``work`` applied to every item by up to ``limit.allowed`` lanes; ``done`` resolves to
    the results in the items' order once every lane has ended. A lane over the limit ends after
    its job; when the limit rises, a lane finishing a job starts the missing ones. After 8 jobs
    a lane goes back to the pool's queue, so work of a higher priority (a large file's next
    parts) is not kept waiting until every small file is done.

    The first exception of any job stops the others taking new items and is what ``done``
    raises. An item never taken (``stop``, or that exception) stays ``None``.
    """

    def __init__(self, items: Sequence[T], work: Callable[[T], R], limit: LaneLimit,
                 submit: Callable[[Callable[[], None]], Future[None]],
                 stop: threading.Event) -> None:
        self._items, self._work, self._limit, self._submit = items, work, limit, submit
        self._stop = stop
        self._results: list[R | None] = [None] * len(items)
        self._next = 0
        self._running = 0
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.done: Future[list[R | None]] = Future()

    def start(self) -> Future[list[R | None]]:
        with self._lock:
            wanted = min(self._limit.allowed, len(self._items))
            self._running += wanted
        for _ in range(wanted):
            self._launch()
        if not wanted:
            self._settle()
        return self.done

    def _launch(self) -> None:
        try:
            self._submit(self._lane).add_done_callback(self._unless_run)
        except BaseException as exc:  # the pool is shut down: this lane never runs
            self._end(exc)

    def _unless_run(self, future: Future[None]) -> None:
        if future.cancelled():  # dropped from the queue by the pool's shutdown
            self._end(None)

    def _lane(self) -> None:
        try:
            for _ in range(_JOBS_PER_HOP):
                index = self._take()
                if index is None:
                    return
                self._results[index] = self._work(self._items[index])
                self._grow(self._limit.job_done())
        except BaseException as exc:
            self._end(exc)
            return
        self._launch()  # still counted as running: it queues again behind better work

    def _take(self) -> int | None:
        """The next item's index; or None, the lane counted out in the same step, so that
        lanes over the limit never all leave at once."""
        with self._lock:
            if not (self._stop.is_set() or self._error is not None
                    or self._next >= len(self._items) or self._running > self._limit.allowed):
                index, self._next = self._next, self._next + 1
                return index
            self._running -= 1
            last = self._running == 0
        if last:
            self._settle()
        return None

    def _grow(self, allowed: int) -> None:
        with self._lock:
            # Lanes running take the items left one by one: new ones join them, up to the limit
            # and never more than there are items left.
            missing = min(allowed - self._running, len(self._items) - self._next)
            if missing <= 0 or self._error is not None or self._stop.is_set():
                return
            self._running += missing
        for _ in range(missing):
            self._launch()

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._running -= 1
            last = self._running == 0
        if last:
            self._settle()

    def _settle(self) -> None:
        if not self.done.set_running_or_notify_cancel():
            return  # the waiter gave up (its task was cancelled): no one to tell
        if self._error is not None:
            self.done.set_exception(self._error)
        else:
            self.done.set_result(self._results)
