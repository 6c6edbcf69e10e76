"""A response body moved from a plaintext socket into a file by ``splice(2)``.

Read through Python, a body is copied twice on its way to disk: from the socket into our
buffer, then from the buffer into the page cache. ``splice`` has the kernel move the socket's
pages into a pipe and from the pipe into the file at an offset, so the bytes never enter the
process. Over loopback on 2 cores, 1 GiB from SeaweedFS on 16 connections took 0.90 against
1.06 s and 0.98 against 1.25 s, with half the system CPU (a bare client, medians of 7 and 11):
the server shares those cores. It applies only where nothing needs the bytes in memory (no
digest to feed), on Linux, and without TLS (the socket then carries the body as sent).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
from typing import Any

from .http11 import Response

MIN_LENGTH = 1 << 20  # shorter bodies: a pipe costs more than the copies it saves
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# What a kernel or filesystem that cannot splice this pair answers (gVisor's sockets, a FUSE
# file): the process then reads every body as usual.
_CANNOT = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_unsupported = False


class Unsupported(Exception):
    """``splice`` cannot move bytes between this socket and file: read the rest as usual."""


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``data`` written at ``offset``, however many calls ``pwrite`` takes."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _give_up() -> Unsupported:
    global _unsupported
    _unsupported = True
    return Unsupported()


class SplicedBody:
    """The rest of ``response``'s body, moved by the kernel from the socket ``source`` into
    files; ``timeout`` is how long the socket may stay silent (None: no limit).

    Any body bytes that arrived with the headers are written first, and the response counts
    every byte moved, so its connection goes back to the pool at the end as after a read.
    """

    def __init__(self, response: Response, source: int,
                 timeout: float | None) -> None:
        self._response = response
        self._source, self._timeout = source, timeout
        self._pipe = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above the system's limit: the default 64 KiB
            fcntl.fcntl(self._pipe[1], _F_SETPIPE_SZ, _PIPE_SIZE)

    def move(self, fd: int, offset: int, count: int) -> int:
        """Move up to ``count`` bytes of the body into ``fd`` at ``offset``; 0 once the
        socket has no more (the store closed it, or ``abort`` shut it down). Raises
        ``TimeoutError`` when nothing arrives within the socket's timeout, as a read would."""
        response = self._response
        count = min(count, response.remaining or 0)
        if count <= 0 or response.fileno() < 0:
            return 0
        if _unsupported:
            raise Unsupported()
        held = response.take_pending(count)  # what came with the headers goes first
        if held:
            pwrite_all(fd, held, offset)
            return len(held)
        while True:
            try:
                got = os.splice(self._source, self._pipe[1], min(count, _PIPE_SIZE))
                break
            except BlockingIOError:
                self._wait()
            except OSError as exc:
                if exc.errno in _CANNOT:  # nothing left the socket
                    raise _give_up() from None
                raise
        moved = 0
        while moved < got:
            try:
                moved += os.splice(self._pipe[0], fd, got - moved, offset_dst=offset + moved)
            except OSError as exc:
                if exc.errno not in _CANNOT:
                    raise
                _give_up()
                data = os.read(self._pipe[0], got - moved)  # the pipe holds them: no loss
                pwrite_all(fd, data, offset + moved)
                moved += len(data)
        response.consumed(got)
        return got

    def _wait(self) -> None:
        """Until the socket has bytes (or is closed): a socket with a timeout is non-blocking
        underneath, so ``splice`` answers EAGAIN instead of waiting."""
        poller = select.poll()
        poller.register(self._source, select.POLLIN)
        if not poller.poll(None if self._timeout is None else int(self._timeout * 1000) + 1):
            raise TimeoutError("timed out")

    def close(self) -> None:
        for end in self._pipe:
            with contextlib.suppress(OSError):
                os.close(end)


def spliced(body: Any) -> SplicedBody | None:
    """``body`` as a ``SplicedBody`` when the kernel can move it: a plain HTTP/1.1 body of
    known length (at least ``MIN_LENGTH``) on a socket without TLS, on a system with
    ``splice``; else None, and the body is read as usual. Out of descriptors for the pipe,
    it is read as usual too."""
    if (_unsupported or not isinstance(body, Response) or not hasattr(os, "splice")
            or not hasattr(select, "poll") or body.remaining is None
            or body.remaining < MIN_LENGTH):
        return None
    stream = body.plain_stream()
    if stream is None:
        return None
    try:
        return SplicedBody(body, *stream)
    except OSError:
        return None
