"""Waiting on blocking work from the event loop without ever abandoning it half done."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """For steps that leave nothing on disk: a cancelled task may abandon the thread."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


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
