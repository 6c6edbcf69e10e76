"""Keep-alive HTTP/1.1 connections to one host, for the signed requests of ``revalidate``.

``http.client`` connections in a small pool, rather than urllib3's: over loopback on 2 cores,
urllib3's pool, header containers and response wrapper took about 0.3 ms of GIL per request
(a HEAD in 0.55 ms against 0.22 ms with ``http.client`` alone), which, with a HEAD and a GET per
small file, was about a fifth of a 256-small-file download; and its connection setup imports
the IDNA codec, 3 ms of every warm start. What those requests need is kept: idle connections
reused until the server drops them (checked before each reuse, as urllib3 does), separate connect
and read timeouts, and TLS through one ``ssl`` context. Proxies never come here: a proxied
endpoint takes the boto3 path. Response headers are read by ``parse_headers`` below rather than
by the ``email`` package, inside ``http.client``'s own ``begin``.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import ssl
import threading
import types
from typing import Any, cast

# A header line as the ``email`` package's feed parser recognises one (its ``headerRE``);
# any other line ends the headers there, as it does in that parser.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")


class ParsedHeaders(http.client.HTTPMessage):
    """The ``HTTPMessage`` http.client gives, plus ``first``: each header's first value by
    lowercased name, what ``get`` answers. ``get`` lowercases every header's name at each call,
    and a small file's two responses are looked up about twenty times."""

    first: dict[str, str]


def parse_headers(fp: Any, _class: type[ParsedHeaders] = ParsedHeaders) -> ParsedHeaders:
    """``http.client.parse_headers`` without the ``email`` feed parser, which took about a
    seventh of the GIL time of a small-file download (py-spy). The same lines, read with the
    same limits (``_read_headers``: at most 100 headers of 64 KiB), kept or skipped by the
    feed parser's rules and stored as its compat32 policy stores them (the name as sent; the
    value without leading blanks or the final line end, continuation lines kept), into an
    ``HTTPMessage`` (``ParsedHeaders``). ``tests/test_connections.py`` compares the two on
    generated input."""
    message = _class()
    # compat32 stores a header as the pair itself (``header_store_parse``) with no count limit,
    # and gives a value back as is unless it has surrogates, which ISO-8859-1 never makes.
    stored: list[tuple[str, str]] = message._headers  # type: ignore[attr-defined]
    first: dict[str, str] = {}
    name: str | None = None
    value: list[str] = []
    for raw in http.client._read_headers(fp):  # type: ignore[attr-defined]
        line = raw.decode("iso-8859-1")
        if not _HEADER_LINE.match(line):
            break  # the blank line, or what the feed parser would take for the body
        if line[0] in " \t":
            if name is not None:  # a continuation of nothing is skipped
                value.append(line)
            continue
        if name is not None:
            joined = "".join(value).rstrip("\r\n")
            stored.append((name, joined))
            first.setdefault(name.lower(), joined)
            name = None
        colon = line.find(":")
        if line.startswith("From ") or colon <= 0:
            continue  # an envelope line, or no name: skipped
        name, value = line[:colon], [line[colon + 1:].lstrip(" \t")]
    if name is not None:
        joined = "".join(value).rstrip("\r\n")
        stored.append((name, joined))
        first.setdefault(name.lower(), joined)
    message.first = first
    return message


def _begin_with_our_parser() -> Any:
    """``http.client``'s own ``HTTPResponse.begin`` (whatever the Python version's is), with
    ``parse_headers`` above in place of its module's: nothing of the status line, 100-continue,
    length, chunking or keep-alive handling is copied here."""
    begin = http.client.HTTPResponse.begin
    namespace = {**vars(http.client), "parse_headers": parse_headers}
    return types.FunctionType(begin.__code__, namespace, begin.__name__, begin.__defaults__,
                              begin.__closure__)


class _Response(http.client.HTTPResponse):
    begin = _begin_with_our_parser()


# A reused connection the server had closed: nothing of the response arrived.
_CLOSED_UNDER_US = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


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
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, headers: dict[str, str]) -> PooledResponse:
        """Send a bodiless request and read the response's status line and headers; the body
        is left for the caller to read. Raises ``ConnectFailure`` when no connection could be
        made, else what ``http.client`` or the socket raised."""
        conn, reused = self._take()
        try:
            return self._exchange(conn, method, path, headers)
        except _CLOSED_UNDER_US:
            if not reused:
                raise
        # The server closed the idle connection as we sent on it (the check before reuse can
        # only see a close that already arrived): once more on a new one, as browsers and
        # urllib3's retries do. HEAD and GET are idempotent.
        return self._exchange(self._connect(), method, path, headers)

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                  headers: dict[str, str]) -> PooledResponse:
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        return PooledResponse(self, conn, response)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection still open (and True), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if not _dropped(conn):
                return conn, True
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(self._host, self._port, timeout=self._connect_timeout,
                                        context=self._tls)
            if self._tls is not None
            else http.client.HTTPConnection(self._host, self._port,
                                            timeout=self._connect_timeout))
        conn.response_class = _Response
        conn._create_connection = self._open_socket  # type: ignore[attr-defined]
        try:
            conn.connect()
        except Exception as exc:
            conn.close()
            raise ConnectFailure(exc) from None
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        return conn

    def _open_socket(self, address: tuple[str, int], timeout: float,
                     source_address: tuple[str, int] | None = None) -> socket.socket:
        """``socket.create_connection`` with an ASCII host name given as bytes: given a
        ``str``, ``getaddrinfo`` encodes it with the IDNA codec, whose import (with
        ``unicodedata``) took 2-3 ms of every start. The codec leaves ASCII names as they are,
        so the resolver sees the same name; TLS still checks the ``str`` name."""
        host, port = address
        return socket.create_connection(
            (host.encode("ascii") if host.isascii() else host, port),  # type: ignore[arg-type]
            timeout, source_address)

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._maxsize:
                self._idle.append(conn)
                return
        conn.close()


def count_body_read(response: http.client.HTTPResponse, n: int) -> None:
    """Account ``n`` bytes of ``response``'s body read outside ``http.client`` (straight from
    its file, or moved by ``splice``), and do what it does at the end of a body: the
    connection (not the socket) is then free for the next request on it."""
    response.length = (response.length or 0) - n
    if n == 0 or response.length == 0:
        response._close_conn()  # type: ignore[attr-defined]


class PooledResponse:
    """A response whose connection goes back to the pool once its body has been read to the
    end (``release_conn``), and is closed otherwise. ``_fp`` is the ``http.client`` response,
    which ``s3io`` reads from directly."""

    def __init__(self, pool: HostConnections, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self._pool = pool
        self._conn: http.client.HTTPConnection | None = conn  # None once given back or closed
        self._fp = response
        self.status = response.status
        self.headers = response.msg
        self.first = cast(ParsedHeaders, response.msg).first

    def read(self, amt: int | None = None) -> bytes:
        return self._fp.read(amt)

    def fileno(self) -> int:
        """The socket the body arrives on, or -1 once the body is over: so that a fatal error
        elsewhere can shut it down (``s3io._interrupt``). Taken from the response, which holds
        the socket even when ``http.client`` let go of the connection (a store answering
        ``Connection: close``, whose ``conn.sock`` is then None)."""
        fp = self._fp.fp
        try:
            return int(fp.fileno()) if fp is not None else -1
        except (OSError, ValueError):
            return -1

    def plain_stream(self) -> tuple[int, float | None] | None:
        """The descriptor the body arrives on, and its read timeout, when it carries the body
        as sent (no TLS): for ``splice``."""
        if self._pool._tls is not None:
            return None
        fd = self.fileno()
        return (fd, self._pool._read_timeout) if fd >= 0 else None

    def release_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._fp.length == 0 and not self._fp.isclosed():
            self._fp.read()  # a HEAD's or an empty body: http.client marks the end on a read
        if self._fp.isclosed() and not self._fp.will_close:
            self._pool._give_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._fp.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection with something to read was closed by the server (or
    holds junk): either way it cannot carry the next request."""
    sock = conn.sock
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
