"""Make a stop signal end a download promptly, with its temp files removed, in every host process.

Without this, SIGTERM (or SIGINT, SIGHUP, SIGQUIT) either kills the process on the spot (CLI,
gunicorn master before its own handlers exist: temp files stay behind), is swallowed until
gunicorn's graceful timeout (a worker in ``post_fork`` still has the master's handler), or waits
for the whole download (uvicorn defers it until startup ends).
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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals_exit() -> Iterator[None]:
    """For blocking downloads in the main thread: a stop signal ends the call with
    ``SystemExit(128 + signal)`` after the engine's cleanup ran. The download running on this
    thread's loop is cancelled (raising inside a running loop could lose a wake-up and hang
    it); outside a loop, the exception is raised at once."""
    if not _main_thread():
        yield
        return
    received: list[int] = []

    def _exit(signum: int, frame: object) -> None:
        received.append(signum)
        if not cancel_from_signal_handler():
            raise SystemExit(128 + signum)

    # A signal the process was told to ignore (nohup's SIGHUP, a background job's SIGINT) stays
    # ignored.
    previous = {sig: signal.signal(sig, _exit) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    except (asyncio.CancelledError, DownloadError, KeyboardInterrupt):
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    else:
        if received:  # the download finished just before the cancel reached it
            raise SystemExit(128 + received[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def stop_signals_cancel(awaitable: Awaitable[T]) -> T:
    """For downloads on a running loop (a lifespan): SIGTERM or SIGINT cancels them and raises
    ``DownloadError``, so startup fails at once; the server's own handlers are restored after."""
    task = asyncio.ensure_future(awaitable)
    if not _main_thread():
        return await task
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def _cancel(signum: int) -> None:
        received.append(signum)
        task.cancel()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    handled = tuple(previous)
    try:
        for sig in handled:
            loop.add_signal_handler(sig, _cancel, sig)
    except (NotImplementedError, RuntimeError, ValueError):
        return await task
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            name = signal.Signals(received[0]).name
            raise DownloadError(f"download interrupted by {name}") from None
        raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
