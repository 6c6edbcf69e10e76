"""``lanes``: how many threads take the quick jobs, and that every job is done once whatever
that number does meanwhile. Clocks are injected: no test here depends on the machine's speed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from lazy_loading.lanes import ConnectionLimit, LaneLimit, Lanes
from lazy_loading.scheduler import PriorityPool, Throttle


class _Clocks:
    """Wall and CPU time that advance only when told."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def window(self, limit: LaneLimit, jobs: int, seconds: float, cores: float,
               amount: int = 1) -> int:
        """``jobs`` finished over ``seconds``, the process using ``cores`` meanwhile."""
        allowed = limit.allowed
        for _ in range(jobs):
            self.wall += seconds / jobs
            self.cpu += seconds * cores / jobs
            allowed = limit.job_done(amount)
        return allowed


def _limit(most: int = 16, kind: type[LaneLimit] = LaneLimit) -> tuple[LaneLimit, _Clocks]:
    clocks = _Clocks()
    return kind(most, clock=lambda: clocks.wall, cpu=lambda: clocks.cpu), clocks


@pytest.mark.parametrize(("most", "nearby", "first"), [(16, True, 4), (16, False, 8),
                                                       (32, False, 8), (2, True, 2)])
def test_gets_start_on_fewer_connections_from_a_nearby_store(most: int, nearby: bool,
                                                             first: int) -> None:
    limit = ConnectionLimit.for_store(most, nearby)
    assert (limit.allowed, limit.most) == (first, most)


def test_a_process_using_a_whole_core_halves_its_lanes_while_the_rate_holds() -> None:
    limit, clocks = _limit()
    assert limit.allowed == 16
    assert [clocks.window(limit, 16, 0.05, 1.2) for _ in range(4)] == [8, 4, 4, 4]


def test_a_store_keeping_the_process_waiting_keeps_every_connection() -> None:
    limit, clocks = _limit()
    assert [clocks.window(limit, 16, 0.05, 0.3) for _ in range(3)] == [16, 16, 16]


def test_a_halving_that_slows_the_jobs_is_undone_for_good() -> None:
    limit, clocks = _limit()
    assert clocks.window(limit, 16, 0.05, 1.0) == 8
    assert clocks.window(limit, 16, 0.10, 1.0) == 16, "half the rate: back to 16"
    assert [clocks.window(limit, 16, 0.05, 1.0) for _ in range(3)] == [16, 16, 16]


def test_lanes_grow_back_when_the_process_goes_idle() -> None:
    limit, clocks = _limit()
    assert [clocks.window(limit, 16, 0.05, 1.0) for _ in range(2)] == [8, 4]
    limit.next_stage()
    assert [clocks.window(limit, 16, 0.05, 0.2) for _ in range(3)] == [8, 16, 16]


def test_gets_start_on_eight_connections_and_a_waiting_process_takes_them_all() -> None:
    limit, clocks = _limit(kind=ConnectionLimit)
    assert limit.allowed == 8
    assert [clocks.window(limit, 16, 0.1, 0.2) for _ in range(2)] == [16, 16]


@pytest.mark.parametrize(("faster", "settles_on"), [(2, 32), (1, 16)])
def test_a_waiting_process_is_granted_16_connections_and_keeps_32_only_if_they_pay(
        faster: int, settles_on: int) -> None:
    """Waiting for the store cannot tell a store that caps each connection, which 32 serve
    twice as fast, from a busy server sharing our cores, which they only slow down."""
    mib = 1 << 20
    clocks = _Clocks()
    limit = ConnectionLimit(32, starts_at=8, granted=16, clock=lambda: clocks.wall,
                            cpu=lambda: clocks.cpu)
    assert clocks.window(limit, 16, 0.1, 0.2, amount=mib) == 16, "granted at once"
    assert clocks.window(limit, 16, 0.1, 0.2, amount=mib) == 32, "still waiting: try 32"
    assert clocks.window(limit, 16, 0.1, 0.2, amount=faster * mib) == 32, "the 32 start"
    assert [clocks.window(limit, 16, 0.1, 0.2, amount=faster * mib)
            for _ in range(3)] == [settles_on] * 3


def test_a_busy_process_goes_down_to_four_connections() -> None:
    limit, clocks = _limit(kind=ConnectionLimit)
    assert [clocks.window(limit, 16, 0.1, 1.3) for _ in range(4)] == [8, 4, 4, 4]


def test_connections_are_halved_after_two_busy_windows_not_one() -> None:
    """A store sending in bursts keeps a core busy one window in two: that is no reason."""
    limit, clocks = _limit(kind=ConnectionLimit)
    assert clocks.window(limit, 16, 0.1, 0.2) == 16
    assert [clocks.window(limit, 16, 0.1, cores) for cores in (1.3, 0.6, 1.3, 0.3)] == [16] * 4
    # The halving is judged on the window after the one in which it showed.
    assert [clocks.window(limit, 16, 0.1, 1.3) for _ in range(4)] == [16, 8, 8, 4]


def test_between_idle_and_busy_more_connections_are_kept_only_while_they_pay() -> None:
    """Half to 0.9 of a core: double to see. The rate counts the amount (bytes), not jobs."""
    limit, clocks = _limit(most=32, kind=ConnectionLimit)
    mib = 1 << 20
    assert clocks.window(limit, 16, 0.1, 0.7, amount=mib) == 16, "trying 16"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=mib) == 16, "the 16 start: not judged"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=2 * mib) == 32, "twice as fast: try 32"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=2 * mib) == 32, "the 32 start"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=2 * mib) == 16, "no faster: back to 16"
    assert [clocks.window(limit, 16, 0.1, 0.7, amount=2 * mib) for _ in range(3)] == [16] * 3
    assert clocks.window(limit, 16, 0.1, 0.2, amount=2 * mib) == 32, "idle: grows anyway"


def test_more_connections_are_judged_once_they_all_send() -> None:
    """A store capping each connection, far enough that new ones send nothing in their first
    window: that window is no reason to undo, nor are the windows before they all run."""
    limit, clocks = _limit(kind=ConnectionLimit)
    running = [8, True]  # GETs running, and whether more wait
    limit.occupancy = lambda: (running[0], running[1])
    mib = 1 << 20
    assert clocks.window(limit, 16, 0.1, 0.7, amount=mib) == 16, "trying 16"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=mib) == 16, "8 of them running yet"
    running[0] = 16
    assert clocks.window(limit, 16, 0.1, 0.7, amount=mib) == 16, "the 16 just started"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=2 * mib) == 16, "twice as fast: kept"
    assert clocks.window(limit, 16, 0.1, 0.7, amount=2 * mib) == 16


def test_a_halving_is_judged_once_the_gets_beyond_it_have_ended() -> None:
    """A GET runs to its end: the rate after a halving falls only once the GETs beyond the new
    limit end. A store capping each connection then shows half the rate: undone for good."""
    limit, clocks = _limit(kind=ConnectionLimit)
    running = [8, True]
    limit.occupancy = lambda: (running[0], running[1])
    mib = 1 << 20
    assert clocks.window(limit, 16, 0.1, 0.2, amount=mib) == 16, "waiting: all of them"
    running[0] = 16
    assert [clocks.window(limit, 16, 0.1, 1.3, amount=2 * mib) for _ in range(2)] == [16, 8]
    assert [clocks.window(limit, 16, 0.1, 1.3, amount=2 * mib) for _ in range(3)] == [8] * 3, \
        "the 16 GETs still run: the same rate is no verdict"
    running[0] = 8
    assert clocks.window(limit, 16, 0.1, 1.0, amount=mib) == 8, "the halving just showed"
    assert clocks.window(limit, 16, 0.1, 0.9, amount=mib) == 16, "half the rate: undone"
    running[0] = 16
    assert [clocks.window(limit, 16, 0.1, 1.3, amount=2 * mib) for _ in range(4)] == [16] * 4


def test_short_windows_change_nothing() -> None:
    limit, clocks = _limit(kind=ConnectionLimit)
    assert clocks.window(limit, 200, 0.045, 0.2) == 8, "connections: less than 50 ms"
    limit, clocks = _limit()
    assert clocks.window(limit, 15, 1.0, 2.0) == 16, "fewer than 16 jobs"
    limit.next_stage()
    assert clocks.window(limit, 200, 0.019, 2.0) == 16, "less than 20 ms"


class _Scripted(LaneLimit):
    """A limit that follows a script, one value per finished job, then stays."""

    def __init__(self, most: int, script: list[int]) -> None:
        super().__init__(most)
        self._script = iter(script)
        self._guard = threading.Lock()

    def job_done(self, amount: int = 1) -> int:
        with self._guard:
            self.allowed = next(self._script, self.allowed)
            return self.allowed


def _run(items: list[int], work: Callable[[int], int], limit: LaneLimit, *, threads: int = 16,
         stop: threading.Event | None = None) -> Future[list[int | None]]:
    pool = PriorityPool(threads)
    pool.start()
    try:
        lanes = Lanes(items, work, limit, lambda lane: pool.submit((1,), lane),
                      stop or threading.Event())
        done = lanes.start()
        done.exception(timeout=30)
        return done
    finally:
        pool.shutdown(wait=True)


def test_every_job_is_done_once_while_the_lanes_fall_and_rise() -> None:
    taken: list[int] = []
    guard = threading.Lock()
    busy = 0
    most_busy = [0]

    def work(item: int) -> int:
        nonlocal busy
        with guard:
            taken.append(item)
            busy += 1
            most_busy[0] = max(most_busy[0], busy)
        with guard:
            busy -= 1
        return item * 2

    script = [16] * 40 + [1] * 200 + [8] * 200
    done = _run(list(range(1000)), work, _Scripted(16, script))
    assert done.result() == [i * 2 for i in range(1000)]
    assert sorted(taken) == list(range(1000))


def test_lanes_over_the_limit_leave_one_at_a_time_and_the_jobs_still_finish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lane finishes a job at the moment the limit drops to one: they must not all see
    themselves over it and leave together, with jobs left undone. A lane's way out is slowed
    down, so that the others look at the count meanwhile."""
    gate = threading.Barrier(8)
    leave = Lanes._end

    def slow_end(self: Lanes[int, int], error: BaseException | None) -> None:
        time.sleep(0.05)
        leave(self, error)

    monkeypatch.setattr(Lanes, "_end", slow_end)

    def work(item: int) -> int:
        if item < 8:
            gate.wait(timeout=10)
        return item

    done = _run(list(range(64)), work, _Scripted(8, [1]))
    assert done.result() == list(range(64))


def test_the_first_failure_stops_the_lanes_and_is_what_they_raise() -> None:
    class Broken(Exception):
        pass

    taken: list[int] = []

    def work(item: int) -> int:
        taken.append(item)
        if item == 3:
            raise Broken("item 3")
        return item

    done = _run(list(range(100)), work, LaneLimit(1), threads=1)
    with pytest.raises(Broken, match="item 3"):
        done.result()
    assert taken == [0, 1, 2, 3]

    taken.clear()
    done = _run(list(range(100)), work, LaneLimit(4), threads=4)
    with pytest.raises(Broken, match="item 3"):
        done.result()
    assert len(taken) <= 8, "the other lanes went on taking jobs"


def test_a_stopped_run_leaves_the_rest_untaken() -> None:
    stop = threading.Event()

    def work(item: int) -> int:
        if item == 2:
            stop.set()
        return item

    done = _run(list(range(50)), work, LaneLimit(1), threads=1, stop=stop)
    assert done.result() == [0, 1, 2] + [None] * 47


def test_a_lane_goes_back_to_the_queue_so_better_work_is_not_kept_waiting() -> None:
    """One thread: a job of a higher priority submitted while a lane runs goes before that
    lane's next hop, not after every small file."""
    pool = PriorityPool(1)
    pool.start()
    order: list[str] = []
    try:
        def urgent() -> None:
            order.append("urgent")

        def work(item: int) -> int:
            if item == 0:
                pool.submit((0,), urgent)
            order.append(str(item))
            return item

        lanes = Lanes(list(range(20)), work, LaneLimit(1),
                      lambda lane: pool.submit((1,), lane), threading.Event())
        assert lanes.start().result(timeout=30) == list(range(20))
    finally:
        pool.shutdown(wait=True)
    assert order.index("urgent") == 8, order


def test_lanes_dropped_by_a_pool_shutting_down_still_settle() -> None:
    """A run that gives up shuts its pool down with lanes still queued: whoever waits on the
    lanes must be told, not left waiting."""
    pool = PriorityPool(1)
    pool.start()
    release = threading.Event()
    pool.submit((0,), release.wait, 10)  # the one thread is busy: the lanes stay queued
    lanes = Lanes(list(range(10)), lambda item: item, LaneLimit(4),
                  lambda lane: pool.submit((1,), lane), threading.Event())
    done = lanes.start()
    pool.shutdown(wait=False)
    release.set()
    assert done.result(timeout=10) == [None] * 10
    pool.shutdown(wait=True)


def _throttled(limit: LaneLimit, jobs: int, work: Callable[[int], None],
               threads: int = 16) -> tuple[list[Future[None]], PriorityPool, Throttle]:
    pool = PriorityPool(threads)
    pool.start()
    throttle = Throttle(pool, limit)
    return [throttle.submit((index,), work, index) for index in range(jobs)], pool, throttle


def test_the_throttle_runs_no_more_jobs_than_allowed_and_lets_more_in_when_it_rises() -> None:
    limit = _Scripted(16, [])
    limit.allowed = 4
    guard = threading.Lock()
    running, most_running, order = [0], [0], []
    release = threading.Event()

    def work(index: int) -> None:
        with guard:
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])
            order.append(index)
        release.wait(10)
        with guard:
            running[0] -= 1

    futures, pool, throttle = _throttled(limit, 40, work)
    try:
        deadline = time.monotonic() + 10
        while len(order) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert sorted(order) == [0, 1, 2, 3], "the first 4 by priority, and no more"
        assert limit.occupancy() == (4, True), "the limit sees what runs and that more wait"
        limit.allowed = 8
        throttle.progress(1)  # the limit rose: waiting jobs go in at once
        while len(order) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(order) == list(range(8))
        release.set()
        for future in futures:
            future.result(timeout=10)
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert most_running[0] == 8
    assert sorted(order) == list(range(40))
    assert limit.occupancy() == (0, False)


def test_throttled_jobs_cancelled_or_dropped_by_a_pool_shutting_down_still_settle() -> None:
    """Two may run on one thread: job 0 runs, job 1 waits in the pool's queue, the others here.
    A run that gives up shuts its pool down: whoever waits on a job must be told."""
    limit = _Scripted(2, [])
    started, release = threading.Event(), threading.Event()

    def work(index: int) -> None:
        started.set()
        release.wait(10)

    futures, pool, _ = _throttled(limit, 5, work, threads=1)
    assert started.wait(10)
    assert futures[4].cancel(), "a job still waiting can be cancelled"
    pool.shutdown(wait=False)
    release.set()
    futures[0].result(timeout=10)
    for future in futures[1:4]:
        with pytest.raises(RuntimeError, match="shut down"):
            future.result(timeout=10)
    pool.shutdown(wait=True)


def test_a_pool_started_on_fewer_threads_starts_one_for_each_job_no_idle_thread_takes() -> None:
    """The engine starts 16 of 32 threads: a 17th job at once, say a part for a store that
    caps each connection, must get a thread of its own, not wait for a part to end. Jobs that
    can only end together tell: one left queued would break the barrier. Many rounds, since
    the fault this caught was a race between a thread taking a job and being counted busy."""
    for _ in range(200):
        pool = PriorityPool(6)
        pool.start(2)
        barrier = threading.Barrier(6, timeout=10)
        try:
            jobs = [pool.submit((1,), barrier.wait) for _ in range(6)]
            for job in jobs:
                job.result(timeout=20)
        finally:
            barrier.abort()
            pool.shutdown(wait=True)
