"""``bridge.run_sync`` in every context it must work in."""

from __future__ import annotations

import _thread
import asyncio
import contextvars
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lazy_loading.bridge import run_sync

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="<unset>")


async def _whoami() -> tuple[int, str]:
    await asyncio.sleep(0.01)
    return threading.get_ident(), request_id.get()


class Boom(Exception):
    pass


async def _fail() -> None:
    await asyncio.sleep(0)
    raise Boom("inner failure")


def test_no_running_loop_runs_in_this_thread_with_context() -> None:
    request_id.set("abc")
    ident, rid = run_sync(_whoami)
    assert ident == threading.get_ident()
    assert rid == "abc"


def test_running_loop_runs_in_a_fresh_thread_with_context(caplog: pytest.LogCaptureFixture) -> None:
    async def outer() -> tuple[int, int, str]:
        request_id.set("from-outer")
        ident, rid = run_sync(_whoami)
        return threading.get_ident(), ident, rid

    with caplog.at_level(logging.WARNING, logger="lazy_loading.bridge"):
        outer_ident, inner_ident, rid = asyncio.run(outer())
    assert inner_ident != outer_ident
    assert rid == "from-outer"
    assert "blocking a running event loop" in caplog.text


@pytest.mark.parametrize("in_loop", [False, True])
def test_original_exception_object_is_reraised(in_loop: bool) -> None:
    if not in_loop:
        with pytest.raises(Boom, match="inner failure") as info:
            run_sync(_fail)
    else:
        async def outer() -> None:
            run_sync(_fail)

        with pytest.raises(Boom, match="inner failure") as info:
            asyncio.run(outer())
    assert any(frame.name == "_fail" for frame in info.traceback)


def test_timeout_is_applied_inside_the_loop() -> None:
    async def slow() -> None:
        await asyncio.sleep(30)

    async def outer() -> None:
        run_sync(slow, timeout=0.3)

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(outer())
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-raises"])
def test_interrupt_while_joining_cancels_the_inner_task(how: str) -> None:
    cleaned = threading.Event()

    async def long_running() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.set()

    async def outer() -> None:
        run_sync(long_running)

    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)
    if how == "ctrl-c":
        # Ctrl-C as an interactive Python sees it, whatever disposition pytest inherited (a
        # background job or a CI runner starts with SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Timer(0.5, _thread.interrupt_main).start()
        expected: type[BaseException] = KeyboardInterrupt
    else:
        def _exit(signum: int, frame: object) -> None:
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, _exit)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        expected = SystemExit
    started = time.monotonic()
    try:
        with pytest.raises(expected):
            asyncio.run(outer())
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert cleaned.wait(5), "the inner task's finally block ran"
    assert time.monotonic() - started < 10


GEVENT_SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import asyncio, gevent
    from lazy_loading.bridge import run_sync

    async def work(i):
        await asyncio.sleep(0.05)
        return i * 2

    jobs = [gevent.spawn(run_sync, work, i) for i in range(6)]
    gevent.joinall(jobs, timeout=30)
    ok = [j.value for j in jobs if j.successful()]
    errors = [repr(j.exception) for j in jobs if not j.successful()]

    async def inside_loop():
        return run_sync(work, 21)

    nested = asyncio.run(inside_loop())
    print("OK", sorted(ok), nested, errors)
""")


def test_concurrent_greenlets_under_gevent_all_succeed() -> None:
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "OK [0, 2, 4, 6, 8, 10] 42 []" in result.stdout, result.stdout + result.stderr
