"""Make SIGTERM stop a download promptly, with its temp files removed, in every host process.

Without this, SIGTERM either kills the process on the spot (CLI, gunicorn master: temp files
stay behind), is swallowed until gunicorn's graceful timeout (a worker in ``post_fork`` still has
the master's handler), or waits for the whole download (uvicorn defers it until startup ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from lazy_loading import DownloadError
from lazy_loading.bridge import cancel_from_signal_handler

T = TypeVar("T")

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """For blocking downloads in the main thread: SIGTERM ends the call with
    ``SystemExit(143)`` after the engine's cleanup ran. The download running on this thread's
    loop is cancelled (raising inside a running loop could lose a wake-up and hang it); outside
    a loop, the exception is raised at once."""
    if not _main_thread():
        yield
        return
    interrupted = False

    def _exit(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        if not cancel_from_signal_handler():
            raise SystemExit(SIGTERM_EXIT_CODE)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    except (asyncio.CancelledError, DownloadError):
        if interrupted:
            raise SystemExit(SIGTERM_EXIT_CODE) from None
        raise
    else:
        if interrupted:  # the download finished just before the cancel reached it
            raise SystemExit(SIGTERM_EXIT_CODE)
    finally:
        signal.signal(signal.SIGTERM, previous)


async def sigterm_cancels(awaitable: Awaitable[T]) -> T:
    """For downloads on a running loop (a lifespan): SIGTERM cancels them and raises
    ``DownloadError``, so startup fails at once; the server's own handler is restored after."""
    task = asyncio.ensure_future(awaitable)
    if not _main_thread():
        return await task
    loop = asyncio.get_running_loop()
    interrupted = False

    def _cancel() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, _cancel)
    except (NotImplementedError, RuntimeError, ValueError):
        return await task
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            raise DownloadError("download interrupted by SIGTERM") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
