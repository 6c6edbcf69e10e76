"""The default gunicorn worker for the Flask app: gunicorn's threaded worker with a read timeout.

Why not gunicorn's ``sync`` worker (DRUM's default): it serves one connection at a time, so as
many half-sent requests as there are workers keep ``/ping/`` from answering until the worker
timeout kills them. Why not ``gevent``: it monkey-patches the model's own libraries. Threads
keep model code ordinary, and the model's hooks are still called one at a time
(``MAX_CONCURRENT_PREDICTIONS``), so a model need not be thread-safe.

gunicorn's threaded worker parks idle connections in its poller (gunicorn >= 24), but a client
that stops in the middle of a request holds a thread for good; here every read and write on a
connection times out after ``DRUM_GUNICORN_READ_TIMEOUT`` seconds without progress.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers import gthread

from .settings import ServerSettings


class ThreadWorker(gthread.ThreadWorker):  # type: ignore[misc]
    def init_process(self) -> None:
        self.read_timeout = float(ServerSettings.from_environ().read_timeout)
        super().init_process()

    def handle(self, conn: Any) -> Any:
        if type(conn) is gthread.TConn:
            conn.__class__ = _TimedConn
            conn.read_timeout = self.read_timeout
        return super().handle(conn)


class _TimedConn(gthread.TConn):  # type: ignore[misc]
    """gunicorn puts the socket in blocking mode, then calls ``init()`` before each request."""

    read_timeout: float

    def init(self) -> None:
        super().init()
        self.sock.settimeout(self.read_timeout)
