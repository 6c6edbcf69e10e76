"""Waiting on blocking work from the event loop without ever abandoning it half done."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """For steps that leave nothing on disk: a cancelled task may abandon the thread."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``to_thread`` for a one-off call: a thread of its own, joined once it has answered.
    The loop's default executor would outlive the call, and closing the loop then shuts it
    down from yet another thread: about half a millisecond of a warm start's ten."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if answer.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed without waiting for us
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=run, name="lazy-loading-call", daemon=True)
    thread.start()
    result = await answer
    thread.join()  # it has answered: it ends at once, and none is alive if the caller forks
    return result


async def settled(future: asyncio.Future[T]) -> T:
    """Wait for ``future`` to complete even when the task is cancelled meanwhile, then deliver
    the cancellation at the next await. A thread abandoned mid-step would leave its temp file
    or descriptor with no one to clean it up."""
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


async def to_thread_settled(fn: Callable[..., T], *args: Any) -> T:
    """A step that creates, writes or removes files, run to completion (see ``settled``)."""
    return await settled(asyncio.get_running_loop().run_in_executor(None, fn, *args))
