"""The signed requests' own HTTP/1.1 client reads every response exactly as http.client does."""

from __future__ import annotations

import http.client
import io
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazy_loading import http11
from lazy_loading.connections import HostConnections
from lazy_loading.http11 import (
    BadStatusLine,
    Connection,
    IncompleteRead,
    LineTooLong,
    ProtocolError,
    RemoteDisconnected,
    Response,
    TooManyHeaders,
    UnknownProtocol,
    UnsafeRequest,
    read_head,
)

_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"),
                min_size=0, max_size=12)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=20)
_LINE = st.one_of(
    st.builds(lambda n, v, sp: f"{n}:{sp}{v}", _NAME, _VALUE, st.sampled_from(["", " ", "\t "])),
    st.builds(lambda v, lead: f"{lead}{v}", _VALUE, st.sampled_from([" ", "\t"])),  # folded
    st.builds(lambda v: f"From {v}", _VALUE),  # an envelope line
    _VALUE,  # anything else, e.g. a line without a colon
)


def _received(data: bytes, method: str = "GET") -> tuple[Response, Connection]:
    """Our response to ``data``, all of it already received (no socket read needed)."""
    left, right = socket.socketpair()
    right.close()
    conn = Connection(left)
    conn.pending = data
    return read_head(conn, method), conn


def _both(block: bytes) -> tuple[list[tuple[str, str]], list[tuple[str, str]], bytes, bytes]:
    theirs_fp = io.BytesIO(block)
    theirs = http.client.parse_headers(theirs_fp)
    response, conn = _received(b"HTTP/1.1 200 OK\r\n" + block)
    try:
        ours = response.headers
        for name in {*(name for name, _ in theirs.items()), "absent"}:
            for spelled in (name, name.lower(), name.upper()):
                assert ours.first.get(spelled.lower()) == theirs.get(spelled), spelled
                assert ours.get(spelled) == theirs.get(spelled), spelled
        return ours.items(), list(theirs.items()), bytes(conn.pending), theirs_fp.read()
    finally:
        conn.close()


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE, max_size=8), st.sampled_from(["\r\n", "\n"]))
def test_every_header_block_parses_as_http_client_parses_it(lines: list[str], eol: str) -> None:
    block = "".join(line + eol for line in lines) + eol + "body"
    ours, theirs, ours_rest, theirs_rest = _both(block.encode("iso-8859-1"))
    assert ours == theirs
    assert ours_rest == theirs_rest, "the same lines are consumed"


def test_an_s3_response_and_its_lookups() -> None:
    block = (b"x-amz-id-2: abc\r\nETag: \"9b2cf535f27731c974343645a3985328\"\r\n"
             b"Content-Length: 262144\r\ncontent-length: 1\r\nLast-Modified: Fri, 27 Nov 2026 "
             b"00:00:00 GMT\r\nX-Folded: one\r\n two\r\n\r\n")
    ours, theirs, _, _ = _both(block)
    assert ours == theirs
    response, conn = _received(b"HTTP/1.1 200 OK\r\n" + block)
    conn.close()
    assert response.headers.get("etag") == '"9b2cf535f27731c974343645a3985328"'
    assert response.remaining == 262144, "the first Content-Length, as http.client reads it"


@pytest.mark.parametrize("block, theirs, ours", [
    (b"A: " + b"x" * 70_000 + b"\r\n\r\n", http.client.LineTooLong, LineTooLong),
    (b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n", http.client.HTTPException,
     TooManyHeaders),
])
@pytest.mark.parametrize("receive", [1, 7, 8192])
def test_limits_on_header_lines_and_count_are_http_clients(
        block: bytes, theirs: type, ours: type, receive: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same limits whether the head came in one piece or trickled in (``receive`` bytes
    per read)."""
    monkeypatch.setattr(http11, "_RECEIVE", receive)
    with pytest.raises(theirs):
        http.client.parse_headers(io.BytesIO(block))
    with pytest.raises(ours):
        _received(b"HTTP/1.1 200 OK\r\n" + block)
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"HTTP/1.1 200 OK\r\n" + block)
        with pytest.raises(ours):
            read_head(Connection(left), "GET")


@pytest.mark.parametrize("receive", [1, 7, 8192])
def test_a_head_at_the_limits_is_read_in_any_pieces(receive: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """100 header lines, one of them 64 KiB long with its line end, split anywhere."""
    monkeypatch.setattr(http11, "_RECEIVE", receive)
    long_value = "v" * (65536 - len("Long: \r\n"))
    head = ("HTTP/1.1 200 OK\r\n" + "".join(f"H{i}: {i}\r\n" for i in range(99))
            + f"Long: {long_value}\r\n\r\nbody").encode()
    left, right = socket.socketpair()
    with left, right:
        right.sendall(head)
        response = read_head(Connection(left), "GET")
    assert len(response.headers.items()) == 100
    assert response.headers.get("long") == long_value
    assert response.headers.get("h98") == "98"


def test_a_hundred_header_lines_are_still_read() -> None:
    block = b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n"
    response, conn = _received(b"HTTP/1.1 200 OK\r\n" + block)
    conn.close()
    assert len(response.headers.items()) == 100


# Whole responses as a store might send them, each read by http.client and by us from a socket.
_RESPONSES = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET"),
    "chunked, extensions and trailers": (
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"5;name=value\r\n<Erro\r\n0a\r\nr>Access</\r\n7\r\nError>\n\r\n0\r\nX-Trailer: 1\r\n\r\n",
        "GET"),
    "to the close": (b"HTTP/1.1 500 Internal\r\nContent-Type: text/xml\r\n\r\n<Error/>", "GET"),
    "HTTP/1.0 without keep-alive": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET"),
    "HTTP/1.0 with keep-alive": (
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", "GET"),
    "Connection: close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                          "GET"),
    "100 Continue first": (
        b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "GET"),
    "a HEAD with a length": (b"HTTP/1.1 200 OK\r\nContent-Length: 262144\r\nETag: \"e\"\r\n\r\n",
                             "HEAD"),
    "204": (b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", "GET"),
    "a negative length": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nuntil close", "GET"),
    "bare line feeds": (b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc", "GET"),
    "a reason with spaces": (b"HTTP/1.1 404 Not  Found here \r\nContent-Length: 0\r\n\r\n", "GET"),
}


def _responses(data: bytes, method: str, receive: int) -> Iterator[tuple[object, ...]]:
    """(status, reason, headers, body, will_close) from http.client, then from us, each over a
    socket the store wrote ``data`` to and closed."""
    for ours in (False, True):
        left, right = socket.socketpair()
        try:
            right.sendall(data)
            right.close()
            if ours:
                conn = Connection(left)
                mine = read_head(conn, method)
                body = b""
                while piece := mine.read(receive):
                    body += piece
                yield mine.status, mine.reason, mine.headers.items(), body, mine.will_close
            else:
                theirs = http.client.HTTPResponse(left, method=method)
                theirs.begin()
                body = theirs.read()
                yield theirs.status, theirs.reason, list(theirs.msg.items()), body, theirs.will_close
        finally:
            left.close()


@pytest.mark.parametrize("receive", [1, 3, 65536], ids=["1-byte reads", "3-byte reads", "64 KiB"])
@pytest.mark.parametrize("name", list(_RESPONSES))
def test_each_framing_reads_as_http_client_reads_it(name: str, receive: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http11, "_RECEIVE", receive)  # the head arrives in pieces too
    data, method = _RESPONSES[name]
    theirs, ours = _responses(data, method, receive)
    assert ours == theirs


@pytest.mark.parametrize("data, theirs, ours", [
    (b"", http.client.RemoteDisconnected, RemoteDisconnected),
    (b"HTTP/1.1 20 OK\r\n\r\n", http.client.BadStatusLine, BadStatusLine),
    (b"ICY 200 OK\r\n\r\n", http.client.BadStatusLine, BadStatusLine),
    (b"XTTP/1.1 200 " + b"\xff" * 5000 + b"\r\n\r\n", http.client.BadStatusLine, BadStatusLine),
    (b"HTTP/2 200 OK\r\n\r\n", http.client.UnknownProtocol, UnknownProtocol),
    (b"HTTP/1.1 " + b"2" * 70_000 + b"\r\n\r\n", http.client.LineTooLong, LineTooLong),
])
def test_a_broken_head_raises_what_http_client_raises(data: bytes, theirs: type,
                                                      ours: type) -> None:
    """The same failure by name; ours are connection errors, so the engine retries them."""
    for reader in ("theirs", "ours"):
        left, right = socket.socketpair()
        with left:
            right.sendall(data)
            right.close()
            if reader == "theirs":
                with pytest.raises(theirs):
                    http.client.HTTPResponse(left, method="GET").begin()
            else:
                with pytest.raises(ours) as raised:
                    read_head(Connection(left), "GET")
                assert isinstance(raised.value, ProtocolError)
                assert isinstance(raised.value, ConnectionError)
                message = str(raised.value)  # the store's text: one bounded line
                assert len(message) <= 80 and "\n" not in message and "\r" not in message


def test_a_head_cut_short_is_an_incomplete_read() -> None:
    """Where http.client would take the cut status line for a whole response without headers,
    the headers' end never came: the response is incomplete."""
    left, right = socket.socketpair()
    with left:
        right.sendall(b"HTTP/1.1 200 OK\r\nContent-Len")
        right.close()
        with pytest.raises(IncompleteRead):
            read_head(Connection(left), "GET")


@pytest.mark.parametrize("chunks", [
    b"5\r\nabc",  # the store closed inside a chunk
    b"zz\r\n",  # not a size
    b"-5\r\nabc\r\n0\r\n\r\n",  # a negative size
])
def test_a_broken_chunked_body_is_an_incomplete_read(chunks: bytes) -> None:
    response, conn = _received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    with conn.sock, pytest.raises(IncompleteRead) as raised:
        response.read()
    assert response.will_close
    assert "abc" not in str(raised.value), "a count, not the store's bytes"


def test_a_header_value_with_a_line_break_is_never_sent() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        pool = HostConnections("127.0.0.1", server.getsockname()[1], None, 5.0, 5.0, 1)
        for headers in ({"If-Match": '"e"\r\nX-Injected: 1'}, {"If-Match": '"e"\nX: 1'},
                        {"If-Match": '"e"\r'}):
            with pytest.raises(UnsafeRequest):
                pool.request("GET", "/bucket/key", headers)
        with pytest.raises(UnsafeRequest):
            pool.request("GET", "/bucket/a key", {})
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing was sent: no connection was even opened
        pool.close()


def test_a_connection_is_reused_only_after_a_body_read_to_its_end() -> None:
    """Keep-alive as a store expects it: the next request goes on the same connection once a
    response was read whole; bytes past a response (a store's junk) retire the connection."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    requests: list[bytes] = []
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK",
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    def serve() -> None:
        server.settimeout(10)
        while answers:
            sock, _ = server.accept()
            accepted.append(sock)
            sock.settimeout(10)
            while answers:
                data = sock.recv(65536)
                if not data:
                    break
                requests.append(data)
                sock.sendall(answers.pop(0))
                if len(requests) == 2:  # the junk after it retires this connection
                    break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with server:
        pool = HostConnections("127.0.0.1", server.getsockname()[1], None, 5.0, 5.0, 4)
        for _ in range(3):
            response = pool.request("GET", "/b/k", {"Host": "x"})
            assert response.read() == b"ok"
            response.release_conn()
        thread.join(10)
        pool.close()
        for sock in accepted:
            sock.close()
    assert len(requests) == 3
    assert len(accepted) == 2, "one connection for the first two, a new one after the junk"
    assert requests[0].startswith(b"GET /b/k HTTP/1.1\r\nHost: x\r\n")
    assert b"Accept-Encoding: identity\r\n" in requests[0]
