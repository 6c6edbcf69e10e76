"""One HTTP/1.1 exchange on a socket: a bodiless request's bytes, the response's head, and its
body read here or handed to the kernel (``splice``). The pool of connections is
``connections``.

Requests are written and responses read on the socket here, rather than through
``http.client`` or urllib3. Over loopback on 2 cores:

* urllib3's pool, header containers and response wrapper took about 0.3 ms of GIL per request
  (a HEAD in 0.55 ms against 0.22 ms with ``http.client`` alone), and its connection setup
  imports the IDNA codec, 3 ms of every warm start;
* ``http.client`` itself then took about 180 µs of CPU per request, 80 µs more than one
  ``sendall`` and one ``recv_into`` parsed here (512 signed requests against SeaweedFS, one
  thread): a request line and each header checked and sent through ``putheader`` and
  ``_output``, and a ``makefile`` reader per response read line by line. With a HEAD and a GET
  per small file, that was about a seventh of a 256-small-file download's CPU.

What ``http.client`` does for these requests is kept: its limits (a status or header line of at
most 64 KiB, at most 100 header lines), its header reading (``email``'s rules, as
``_header_pairs`` says), its framing (Content-Length, chunked, or to the close; none for a
HEAD, a 1xx, 204 or 304; a 100 Continue skipped), its keep-alive rules (HTTP/1.0,
``Connection: close``), its request checks (no line break in a header value, no control
character or space in the path) and ``Accept-Encoding: identity``. Its exceptions are named
here after its own, as connection errors (``ProtocolError``): a broken or cut response is
retried, as urllib3 classes it on the boto3 path, and ``http.client`` (with the ``email``
parser, 3 ms of every start) is not imported. Added: a connection carrying bytes past a
response is never reused.
"""

from __future__ import annotations

import re
import socket
from typing import Protocol

_MAX_LINE = 65536  # http.client's _MAXLINE
_MAX_HEADERS = 100  # http.client's _MAXHEADERS
# Bytes asked for per recv while a head arrives (what ``http.client``'s buffered reader asks
# for): a head is smaller, and the body after it is better read straight into the caller's
# buffer than copied through ours.
_RECEIVE = 8192
_BLANK_LINE = re.compile(rb"\n\r?\n")  # a line end followed by an empty line
# A header line as the ``email`` package's feed parser recognises one (its ``headerRE``);
# any other line ends the headers there, as it does in that parser.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
_LINES = re.compile(r"[^\n]*\n")
# Header lines as stores send them: a name, a colon, a value, each on its own line. A block of
# only these reads the same through one ``findall``; anything else takes the feed parser's rules.
_PLAIN_BLOCK = re.compile(r"(?:[\041-\071\073-\176]+:[^\r\n]*\r?\n)*")
_PLAIN_LINE = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\r\n]*)\r?\n")
_UNSAFE_PATH = re.compile(r"[\x00-\x20\x7f]")  # http.client's _contains_disallowed_url_pchar_re
_NO_BODY = (204, 304)

_CONTINUE = 100


class ProtocolError(ConnectionError):
    """What the store sent is not an HTTP/1.1 response, or stopped short of one: the
    connection is done for, and another attempt may do better. Its message never carries
    more than 64 characters of what the store sent (``_quoted``)."""


class RemoteDisconnected(ProtocolError):
    """The connection closed before any byte of the response."""


class IncompleteRead(ProtocolError):
    """The connection closed inside the response, or a chunk's size could not be read."""


class LineTooLong(ProtocolError):
    """A status, header or chunk line longer than ``http.client`` accepts."""


class TooManyHeaders(ProtocolError):
    """More header lines than ``http.client`` accepts."""


class BadStatusLine(ProtocolError):
    """A status line that is not ``HTTP/x.y NNN reason``."""


class UnknownProtocol(ProtocolError):
    """A status line naming an HTTP version other than 1.x."""


class UnsafeRequest(ValueError):
    """A header value with a line break, or a path with a control character or space: sent,
    either would change the request (``http.client`` refuses both too)."""


class Home(Protocol):
    """Where a response's connection goes back once its body is read: the pool it came from."""

    @property
    def read_timeout(self) -> float: ...

    @property
    def plain(self) -> bool:
        """No TLS: the socket carries the body as sent."""

    def give_back(self, conn: Connection) -> None: ...


class Headers:
    """A response's header lines as sent (``items``), and each header's first value by
    lowercased name (``first``, what ``get`` answers)."""

    __slots__ = ("_pairs", "first")

    def __init__(self, pairs: list[tuple[str, str]], first: dict[str, str]) -> None:
        self._pairs = pairs
        self.first = first

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.first.get(name.lower(), default)


def _header_pairs(block: str) -> Headers:
    """The header lines of ``block`` (each ending in a line feed) as ``http.client`` stores
    them through the ``email`` feed parser and its compat32 policy: kept or skipped by that
    parser's rules, the name as sent, the value without leading blanks or the final line end,
    continuation lines kept. ``tests/test_connections.py`` compares the two on generated
    input."""
    if _PLAIN_BLOCK.fullmatch(block):
        pairs: list[tuple[str, str]] = _PLAIN_LINE.findall(block)
        return Headers(pairs, {name.lower(): value for name, value in reversed(pairs)})
    pairs = []
    first: dict[str, str] = {}
    name: str | None = None
    value: list[str] = []
    for line in _LINES.findall(block):
        if not _HEADER_LINE.match(line):
            break  # what the feed parser would take for the body
        if line[0] in " \t":
            if name is not None:  # a continuation of nothing is skipped
                value.append(line)
            continue
        if name is not None:
            joined = "".join(value).rstrip("\r\n")
            pairs.append((name, joined))
            first.setdefault(name.lower(), joined)
            name = None
        colon = line.find(":")
        if line.startswith("From ") or colon <= 0:
            continue  # an envelope line, or no name: skipped
        name, value = line[:colon], [line[colon + 1:].lstrip(" \t")]
    if name is not None:
        joined = "".join(value).rstrip("\r\n")
        pairs.append((name, joined))
        first.setdefault(name.lower(), joined)
    return Headers(pairs, first)


class Connection:
    """One socket, and the bytes received on it past what its responses have read."""

    __slots__ = ("pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: memoryview | bytes = b""

    def receive(self, most: int) -> bytes | memoryview:
        """What was received already, else one ``recv`` (b"" once the peer closed)."""
        pending = self.pending
        if pending:
            self.pending = pending[most:]
            return pending[:most]
        return self.sock.recv(most)

    def close(self) -> None:
        self.sock.close()


def request_bytes(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()),
             "Accept-Encoding: identity", "", ""]
    text = "\r\n".join(lines)
    ends = len(lines) - 1
    if text.count("\n") != ends or text.count("\r") != ends:
        raise UnsafeRequest("a header value with a line break")
    if _UNSAFE_PATH.search(path) or not path.isascii():
        raise UnsafeRequest(f"a path with a control character or space: {path!r}")
    return text.encode("iso-8859-1")


def read_head(conn: Connection, method: str) -> Response:
    """The status line and headers of the next response on ``conn``; what follows them stays
    in ``conn.pending``. A 100 Continue is skipped, as ``http.client`` does. Each byte is
    looked at a bounded number of times, however the store splits its head into packets: a
    head trickled a byte at a time costs time, never CPU growing with its square."""
    data = bytearray(conn.pending)
    conn.pending = b""
    start = 0
    while True:
        end = data.find(b"\n", start)
        while end < 0:
            if len(data) - start > _MAX_LINE:
                raise LineTooLong("status line")
            scanned = _receive_more(conn, data, start)
            end = data.find(b"\n", scanned)
        if end + 1 - start > _MAX_LINE:
            raise LineTooLong("status line")
        blank = _BLANK_LINE.search(data, end)
        lines, line_start, counted = 0, end + 1, end + 1
        while blank is None:
            lines += data.count(b"\n", counted)  # in the bytes not yet looked at
            newest = data.rfind(b"\n", counted)
            line_start = newest + 1 if newest >= 0 else line_start
            counted = len(data)
            if lines > _MAX_HEADERS:
                raise TooManyHeaders(f"got more than {_MAX_HEADERS} headers")
            if len(data) - line_start > _MAX_LINE:
                raise LineTooLong("header line")
            scanned = _receive_more(conn, data, start)
            blank = _BLANK_LINE.search(data, max(end, scanned - 2))  # a blank line is 3 bytes at most
        block = bytes(data[end + 1:blank.start() + 1])
        if block.count(b"\n") > _MAX_HEADERS:
            raise TooManyHeaders(f"got more than {_MAX_HEADERS} headers")
        status_line = str(data[start:end + 1], "iso-8859-1")
        version, status, reason = _status(status_line)
        start = blank.end()
        if status != _CONTINUE:
            break
    if max(map(len, block.split(b"\n"))) + 1 > _MAX_LINE:
        raise LineTooLong("header line")
    conn.pending = memoryview(bytes(data[start:])) if start < len(data) else b""
    return Response(conn, method, version, status, reason.strip(),
                    _header_pairs(str(block, "iso-8859-1")))


def _receive_more(conn: Connection, data: bytearray, start: int) -> int:
    """Append one ``recv`` to ``data``; returns its length before. The store closing the
    connection ends the response: before any byte of it, as ``RemoteDisconnected``."""
    more = conn.sock.recv(_RECEIVE)
    if not more:
        if len(data) == start:
            raise RemoteDisconnected("Remote end closed connection without response")
        raise IncompleteRead(f"{len(data) - start} bytes of a head")
    before = len(data)
    data += more
    return before


def _quoted(text: str) -> str:
    """At most 64 characters of the store's ``text``, quoted: one bounded line in a message."""
    return repr(text[:64]) + ("..." if len(text) > 64 else "")


def _status(line: str) -> tuple[str, int, str]:
    """``http.client``'s ``_read_status`` on a status line that arrived."""
    try:
        version, status, reason = line.split(None, 2)
    except ValueError:
        try:
            version, status = line.split(None, 1)
            reason = ""
        except ValueError:
            version = ""
    if not version.startswith("HTTP/"):
        raise BadStatusLine(_quoted(line))
    try:
        code = int(status)
    except ValueError:
        raise BadStatusLine(_quoted(line)) from None
    if code < 100 or code > 999:
        raise BadStatusLine(_quoted(line))
    return version, code, reason


class Response:
    """A response whose body is read here (``readinto1``, ``read``), or moved by the kernel
    (``take_pending``, ``consumed``). Its connection goes back to the pool when the body was
    read to its end and nothing came after it (``release_conn``); it is closed otherwise."""

    def __init__(self, conn: Connection, method: str, version: str, status: int, reason: str,
                 headers: Headers) -> None:
        self._conn: Connection | None = conn  # None once given back or closed
        self.home: Home | None = None  # set by the pool that sent the request
        self.status, self.reason, self.headers = status, reason, headers
        self.first = headers.first
        if version in ("HTTP/1.0", "HTTP/0.9"):
            http11 = False
        elif version.startswith("HTTP/1."):
            http11 = True
        else:
            raise UnknownProtocol(_quoted(version))
        self.chunked = self.first.get("transfer-encoding", "").lower() == "chunked"
        self._chunk_left: int | None = None
        self.will_close = _will_close(self.first, http11)
        self.remaining: int | None = None  # body bytes still to come, when known
        length = self.first.get("content-length")
        if length and not self.chunked:
            try:
                self.remaining = int(length)
            except ValueError:
                pass
            else:
                if self.remaining < 0:
                    self.remaining = None
        if status in _NO_BODY or 100 <= status < 200 or method == "HEAD":
            self.remaining = 0
        if not self.will_close and not self.chunked and self.remaining is None:
            self.will_close = True
        self._ended = self.remaining == 0

    def readinto1(self, view: memoryview) -> int:
        """At most one ``recv`` of a body of known length into ``view``; 0 at its end, or
        when the store closed the connection before it (then ``remaining`` is not 0)."""
        want = min(len(view), self.remaining or 0)
        conn = self._conn
        if want <= 0 or conn is None:
            return 0
        pending = conn.pending
        if pending:
            n = min(want, len(pending))
            view[:n] = pending[:n]
            conn.pending = pending[n:]
        else:
            n = conn.sock.recv_into(view, want)
        self.consumed(n)
        return n

    def take_pending(self, most: int) -> bytes:
        """Body bytes that arrived with the headers (at most ``most``), counted as read."""
        conn = self._conn
        if conn is None or not conn.pending or self.remaining is None:
            return b""
        data = bytes(conn.pending[:min(most, self.remaining)])
        conn.pending = conn.pending[len(data):]
        self.consumed(len(data))
        return data

    def consumed(self, n: int) -> None:
        """Account ``n`` bytes of a body of known length read or moved (0: the peer closed)."""
        if self.remaining is None:
            return
        self.remaining -= n
        if self.remaining == 0:
            self._ended = True
        elif n == 0:
            self.will_close = True

    def read(self, amt: int | None = None) -> bytes:
        """Up to ``amt`` bytes of the body (all of it for None); fewer only at its end."""
        if self._conn is None or self._ended:
            return b""
        if self.chunked:
            return self._read_chunked(amt)
        if self.remaining is not None:  # into one buffer, as few recvs as the socket needs
            buffer = bytearray(self.remaining if amt is None else min(amt, self.remaining))
            with memoryview(buffer) as view:
                filled = 0
                while filled < len(buffer) and (n := self.readinto1(view[filled:])):
                    filled += n
            del buffer[filled:]
            return bytes(buffer)
        out = bytearray()
        while amt is None or len(out) < amt:
            data = self._conn.receive(65536 if amt is None else amt - len(out))
            if not data:  # a body to the close: this is its end
                self._ended = self.will_close = True
                break
            out += data
        return bytes(out)

    def _read_chunked(self, amt: int | None) -> bytes:
        conn = self._conn
        assert conn is not None
        out = bytearray()
        while amt is None or len(out) < amt:
            if not self._chunk_left:
                if self._chunk_left == 0:
                    self._exact(conn, 2)  # the CRLF after a chunk's data
                size_line = self._line(conn, "chunk size")
                try:
                    self._chunk_left = int(size_line.split(b";", 1)[0], 16)
                except ValueError:  # as http.client: a short or garbled size line
                    self.will_close = True
                    raise IncompleteRead(f"{len(out)} bytes read") from None
                if self._chunk_left < 0:
                    self.will_close = True
                    raise IncompleteRead(f"{len(out)} bytes read")
                if self._chunk_left == 0:
                    while self._line(conn, "trailer line") not in (b"\r\n", b"\n", b""):
                        pass
                    self._ended = True
                    break
            most = self._chunk_left if amt is None else min(self._chunk_left, amt - len(out))
            data = self._exact(conn, most)
            out += data
            self._chunk_left -= len(data)
        return bytes(out)

    def _exact(self, conn: Connection, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = conn.receive(n - len(out))
            if not data:
                self.will_close = True
                raise IncompleteRead(f"{len(out)} bytes read, {n - len(out)} more expected")
            out += data
        return bytes(out)

    def _line(self, conn: Connection, what: str) -> bytes:
        """One line of a chunked body's framing, its end included (b"" at the close); what
        arrived past it stays pending. Looked for 256 bytes at a time: the bytes pending
        after it are never copied for it."""
        line = bytearray()
        while not line.endswith(b"\n"):
            pending = conn.pending
            if pending:
                window = bytes(pending[:256])
                cut = window.find(b"\n") + 1 or len(window)
                conn.pending = pending[cut:]
            else:
                window = conn.sock.recv(256)
                if not window:
                    break
                cut = window.find(b"\n") + 1 or len(window)
                conn.pending = memoryview(window)[cut:] if cut < len(window) else b""
            line += window[:cut]
            if len(line) > _MAX_LINE:
                self.will_close = True
                raise LineTooLong(what)
        return bytes(line)

    def fileno(self) -> int:
        """The socket the body arrives on, or -1 once the body is over or the connection let
        go: so that a fatal error elsewhere can shut it down (``s3io._interrupt``)."""
        conn = self._conn
        if conn is None or self._ended:
            return -1
        try:
            return conn.sock.fileno()
        except (OSError, ValueError):
            return -1

    def plain_stream(self) -> tuple[int, float | None] | None:
        """The descriptor the body arrives on, and its read timeout, when it carries the body
        as sent (no TLS): for ``splice``."""
        home = self.home
        if home is None or not home.plain:
            return None
        fd = self.fileno()
        return (fd, home.read_timeout) if fd >= 0 else None

    def release_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._ended and not self.will_close and not conn.pending and self.home is not None:
            self.home.give_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _will_close(first: dict[str, str], http11: bool) -> bool:
    """``http.client``'s ``_check_close``."""
    connection = first.get("connection", "").lower()
    if http11:
        return "close" in connection
    if first.get("keep-alive") or "keep-alive" in connection:
        return False
    return "keep-alive" not in first.get("proxy-connection", "").lower()
