"""Run a coroutine function to completion from synchronous code, whatever the caller's context.

* No running loop in this thread: run it here, on a fresh loop (``asyncio.run``-style).
* A running loop in this thread: run it on a new loop in a new OS thread and join it. The caller's
  loop is blocked meanwhile (we log a warning: callers inside a loop should await the async API).
* gevent monkey-patching: every greenlet of an OS thread shares asyncio's "running loop" slot, so
  concurrent ``asyncio.run`` calls collide. We serialize asyncio use per OS thread with a lock.

The original exception object is re-raised in the caller, context variables are copied in, and a
``KeyboardInterrupt``/``SystemExit`` while joining cancels the inner task before re-raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 10.0

_gevent_locks: dict[int, Any] = {}
_gevent_locks_guard = threading.Lock()


def _gevent_patched() -> bool:
    if "gevent" not in sys.modules:
        return False
    try:
        from gevent import monkey

        return bool(monkey.is_module_patched("threading"))
    except Exception:
        return False


def _real_thread_ident() -> int:
    """The OS thread id, even when ``threading.get_ident`` is patched to return greenlet ids."""
    if _gevent_patched():
        from gevent import monkey

        return int(monkey.get_original("_thread", "get_ident")())
    return threading.get_ident()


def _gevent_lock_for_this_os_thread() -> Any:
    from gevent.lock import RLock

    ident = _real_thread_ident()
    with _gevent_locks_guard:
        lock = _gevent_locks.get(ident)
        if lock is None:
            lock = _gevent_locks[ident] = RLock()
        return lock


async def _with_timeout(coro_fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                        timeout: float | None) -> T:
    if timeout is None:
        return await coro_fn(*args)
    return await asyncio.wait_for(coro_fn(*args), timeout)


_roots = threading.local()  # the task run_sync runs on this thread's own loop, if any


def _run_here(coro_fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
              timeout: float | None, ctx: contextvars.Context) -> T:
    async def root() -> T:
        _roots.task = asyncio.current_task()
        try:
            return await _with_timeout(coro_fn, args, timeout)
        finally:
            _roots.task = None

    return ctx.run(asyncio.run, root())


def cancel_from_signal_handler() -> bool:
    """For a signal handler of the thread that runs ``run_sync`` on its own loop: cancel that
    run instead of raising, and say whether there was one.

    An exception raised by a signal handler lands wherever the loop happens to be, possibly in
    the callback that hands a worker thread's result to its waiter; that waiter then never
    wakes and the loop's shutdown hangs. Cancelling the task lets every cleanup run normally.
    """
    task: asyncio.Task[Any] | None = getattr(_roots, "task", None)
    if task is None or task.done():
        return False
    task.get_loop().call_soon_threadsafe(task.cancel)
    return True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def run_sync(coro_fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
    """Call ``await coro_fn(*args)`` from sync code and return its result (see module doc).

    Pass the coroutine *function*, not a coroutine object, so nothing is created (and leaked as
    "never awaited") when the call fails before it starts.
    """
    ctx = contextvars.copy_context()
    if _gevent_patched():
        with _gevent_lock_for_this_os_thread():
            if _running_loop() is None:
                return _run_here(coro_fn, args, timeout, ctx)
            return _run_in_os_thread(coro_fn, args, timeout, ctx, native=True)
    if _running_loop() is None:
        return _run_here(coro_fn, args, timeout, ctx)
    logger.warning(
        "blocking a running event loop until the download finishes; "
        "await download_lazy_loading_files_async() instead"
    )
    return _run_in_os_thread(coro_fn, args, timeout, ctx, native=False)


class _Outcome:
    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Future[Any] | None = None
        self.started = threading.Event()


def _run_in_os_thread(coro_fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                      timeout: float | None, ctx: contextvars.Context, native: bool) -> T:
    outcome = _Outcome()

    async def main() -> Any:
        outcome.loop = asyncio.get_running_loop()
        outcome.task = asyncio.current_task()
        outcome.started.set()
        return await _with_timeout(coro_fn, args, timeout)

    def target() -> None:
        try:
            outcome.result = ctx.run(asyncio.run, main())
        except BaseException as exc:
            outcome.error = exc
        finally:
            outcome.started.set()

    done = threading.Event()

    def runner() -> None:
        try:
            target()
        finally:
            done.set()

    if native:
        # Under gevent a patched Thread is a greenlet on this OS thread; we need a real one.
        from gevent import monkey

        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        start_new_thread(runner, ())
        _wait_native(done)
    else:
        outer = asyncio.current_task()
        thread = threading.Thread(target=runner, name="lazy-loading-bridge", daemon=True)
        thread.start()
        try:
            while not done.wait(0.1):
                if outer is not None and _cancel_requested(outer):
                    # asyncio.run turns Ctrl-C into a cancel of the (blocked) main task; honour
                    # it now instead of after the whole download.
                    raise asyncio.CancelledError()
        except BaseException:
            _cancel(outcome, done)
            raise
    if outcome.error is not None:
        raise outcome.error
    return outcome.result  # type: ignore[no-any-return]


def _cancel_requested(task: asyncio.Task[Any]) -> bool:
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling()) if cancelling is not None else False


def _wait_native(done: threading.Event) -> None:
    """Wait for a native thread from a greenlet without blocking the gevent hub forever."""
    import gevent

    while not done.is_set():
        gevent.sleep(0.05)


def _cancel(outcome: _Outcome, done: threading.Event) -> None:
    outcome.started.wait(CANCEL_GRACE_SECONDS)
    loop, task = outcome.loop, outcome.task
    if loop is not None and task is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(task.cancel)
    done.wait(CANCEL_GRACE_SECONDS)
