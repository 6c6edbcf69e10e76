"""Keep-alive HTTP/1.1 connections to one host, for the signed requests of ``revalidate``.

Each exchange is ``http11``'s. Here: idle connections reused until the server drops them
(checked before each reuse, as urllib3 does), a request that finds its reused connection closed
under it sent once more on a new one, separate connect and read timeouts, ``TCP_NODELAY``, TLS
through one ``ssl`` context checking the host name. Proxies never come here: a proxied endpoint
takes the boto3 path.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading

from .http11 import Connection, RemoteDisconnected, Response, read_head, request_bytes

# A reused connection the server had closed: nothing of the response arrived.
_CLOSED_UNDER_US = (RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class ConnectFailure(Exception):
    """The connection (TCP, then TLS) could not be set up; ``cause`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class HostConnections:
    """Up to ``maxsize`` idle keep-alive connections to one ``host:port``, shared by threads."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None,
                 connect_timeout: float, read_timeout: float, maxsize: int) -> None:
        self._host, self._port, self._tls = host, port, tls
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._maxsize = maxsize
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, headers: dict[str, str]) -> Response:
        """Send a bodiless request and read the response's status line and headers; the body
        is left for the caller to read. Raises ``ConnectFailure`` when no connection could be
        made, else what the socket raised or a ``ProtocolError`` for what the store sent."""
        request = request_bytes(method, path, headers)
        conn, reused = self._take()
        try:
            return self._exchange(conn, method, request)
        except _CLOSED_UNDER_US:
            if not reused:
                raise
        # The server closed the idle connection as we sent on it (the check before reuse can
        # only see a close that already arrived): once more on a new one, as browsers and
        # urllib3's retries do. HEAD and GET are idempotent.
        return self._exchange(self._connect(), method, request)

    def _exchange(self, conn: Connection, method: str, request: bytes) -> Response:
        try:
            conn.sock.sendall(request)
            response = read_head(conn, method)
        except BaseException:
            conn.close()
            raise
        response.home = self
        return response

    @property
    def read_timeout(self) -> float:
        return self._read_timeout

    @property
    def plain(self) -> bool:
        return self._tls is None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> tuple[Connection, bool]:
        """An idle connection still open (and True), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if not _dropped(conn):
                return conn, True
            conn.close()

    def _connect(self) -> Connection:
        try:
            sock = self._open_socket()
        except Exception as exc:
            raise ConnectFailure(exc) from None
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                if exc.errno != errno.ENOPROTOOPT:
                    raise
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
        except Exception as exc:
            sock.close()
            raise ConnectFailure(exc) from None
        sock.settimeout(self._read_timeout)
        return Connection(sock)

    def _open_socket(self) -> socket.socket:
        """``socket.create_connection`` with an ASCII host name given as bytes: given a
        ``str``, ``getaddrinfo`` encodes it with the IDNA codec, whose import (with
        ``unicodedata``) took 2-3 ms of every start. The codec leaves ASCII names as they are,
        so the resolver sees the same name; TLS still checks the ``str`` name."""
        host = self._host
        return socket.create_connection(
            (host.encode("ascii") if host.isascii() else host, self._port),  # type: ignore[arg-type]
            self._connect_timeout)

    def give_back(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < self._maxsize:
                self._idle.append(conn)
                return
        conn.close()


def _dropped(conn: Connection) -> bool:
    """An idle keep-alive connection with something to read was closed by the server (or
    holds junk): either way it cannot carry the next request."""
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))
