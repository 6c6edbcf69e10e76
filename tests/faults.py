"""Misbehaving S3 stores for tests.

* ``FaultInjector``: a WSGI layer around moto's S3 app, with a request/body-byte ledger. Rules
  are matched in order against each request (method, key); a rule fires ``times`` times
  (``None`` = forever). Deterministic: no randomness unless a test seeds it.
* ``MisbehavingStore``: a small S3-like server of its own, for faults a WSGI layer cannot make
  (headers that trickle byte by byte, keep-alive connection counting).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
             b"<Message>We encountered an internal error.</Message></Error>")


@dataclass
class Rule:
    """One fault. ``action``: status | cut | stall | throttle | bad_range | bad_length | corrupt |
    headers | trickle.

    ``headers`` replaces response headers (``None`` drops one), for ``status`` and ``headers``;
    ``body`` is a ``status`` fault's body (default: an S3 error document for the status);
    ``trickle`` sends the body one byte every ``seconds``.
    """

    action: str
    method: str = "GET"
    key: str | None = None
    times: int | None = 1
    status: int = 503
    after_bytes: int = 0
    seconds: float = 0.0
    rate: int = 0  # bytes per second for throttle
    headers: dict[str, str | None] = field(default_factory=dict)
    body: bytes | None = None
    ignore_if_match: bool = False
    # Run once, when the first matching response is ready and before its body is sent: with one
    # connection, the client cannot ask for anything else until it has that body.
    on_first_response: Callable[[], None] | None = None
    fired: int = 0

    def matches(self, method: str, key: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        return self.method == method and (self.key is None or self.key == key)


@dataclass
class Ledger:
    body_bytes: Counter[str] = field(default_factory=Counter)
    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    # How many slow answers (``headers`` rules with ``seconds``) were waiting as each one began,
    # itself included: the requests the client had in flight at once.
    slow_answers_waiting: list[int] = field(default_factory=list)
    slow_answers_at: list[float] = field(default_factory=list)  # time.monotonic() of each

    def gets(self, key: str | None = None) -> int:
        return sum(1 for m, k, _, _ in self.requests if m == "GET" and (key is None or k == key))


class FaultInjector:
    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.ledger = Ledger()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._waiting = 0

    def reset(self) -> None:
        with self._lock:
            self.rules.clear()
            self.ledger = Ledger()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def _pick(self, method: str, key: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, key):
                    rule.fired += 1
                    return rule
        return None

    def __call__(self, app: WSGIApp) -> WSGIApp:
        def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            method = environ["REQUEST_METHOD"]
            path = environ.get("PATH_INFO", "")
            parts = path.lstrip("/").split("/", 1)
            key = parts[1] if len(parts) == 2 else ""
            rng = environ.get("HTTP_RANGE")
            rule = self._pick(method, key) if key else None
            if rule is not None and rule.ignore_if_match:
                environ.pop("HTTP_IF_MATCH", None)
            if rule is not None and rule.action == "headers" and rule.seconds:
                self._answer_slowly(rule.seconds)
            status_holder: list[Any] = []
            with self._lock:
                self.ledger.requests.append((method, key, rng, rule.fired if rule else 0))
            if rule is not None and rule.action == "status":
                body = _SLOWDOWN if rule.status == 503 else _INTERNAL
                if rule.status in (403, 404):
                    body = b""
                if rule.body is not None:
                    body = rule.body
                start_response(f"{rule.status} Fault", _replace(
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
                    rule.headers))
                return self._counted(key, body) if method != "HEAD" else []

            def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                if rule is not None and rule.action == "headers":
                    headers = _replace(headers, rule.headers)
                if rule is not None and rule.action == "bad_range":
                    headers = [(h, v) for h, v in headers if h.lower() != "content-range"]
                    headers.append(("Content-Range", "bytes 0-0/1"))
                if rule is not None and rule.action == "bad_length":
                    length = next(int(v) for h, v in headers if h.lower() == "content-length")
                    headers = [(h, v) for h, v in headers if h.lower() != "content-length"]
                    headers.append(("Content-Length", str(max(0, length - 10))))
                status_holder.append(status)
                return start_response(status, headers, exc_info)

            result = app(environ, capture)
            if method != "GET" or not key:
                return result
            return self._body(result, key, rule)

        return middleware

    def _answer_slowly(self, seconds: float) -> None:
        """A slow answer: a window for the test to act in, and a count of how many the client
        keeps waiting at once."""
        with self._lock:
            self._waiting += 1
            self.ledger.slow_answers_waiting.append(self._waiting)
            self.ledger.slow_answers_at.append(time.monotonic())
        try:
            time.sleep(seconds)
        finally:
            with self._lock:
                self._waiting -= 1

    def _body(self, result: Iterable[bytes], key: str, rule: Rule | None) -> Iterator[bytes]:
        sent = 0
        if rule is not None and rule.on_first_response is not None:
            hook, rule.on_first_response = rule.on_first_response, None
            hook()
        try:
            for chunk in result:
                if not chunk:
                    continue
                if rule is not None and rule.action in ("cut", "stall", "short") \
                        and sent + len(chunk) > rule.after_bytes:
                    head = chunk[: max(0, rule.after_bytes - sent)]
                    if head:
                        self._count(key, len(head))
                        yield head
                    if rule.action == "stall":
                        deadline = time.monotonic() + rule.seconds
                        while time.monotonic() < deadline and not self.stopping.is_set():
                            time.sleep(0.05)
                    raise ConnectionAbortedError("fault injection: connection cut")
                if rule is not None and rule.action == "trickle":
                    for i in range(len(chunk)):
                        if self.stopping.is_set():
                            raise ConnectionAbortedError("stopping")
                        time.sleep(rule.seconds)
                        self._count(key, 1)
                        yield chunk[i:i + 1]
                    sent += len(chunk)
                    continue
                if rule is not None and rule.action == "corrupt" and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]  # same length, one bit pattern off
                if rule is not None and rule.action in ("throttle", "headers") and rule.rate:
                    for i in range(0, len(chunk), 65536):
                        piece = chunk[i:i + 65536]
                        time.sleep(len(piece) / rule.rate)
                        if self.stopping.is_set():
                            raise ConnectionAbortedError("stopping")
                        self._count(key, len(piece))
                        sent += len(piece)
                        yield piece
                    continue
                self._count(key, len(chunk))
                sent += len(chunk)
                yield chunk
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


    def _counted(self, key: str, body: bytes) -> Iterator[bytes]:
        """An error body in pieces, counted as they are handed to the socket."""
        for i in range(0, len(body), 256 * 1024):
            self._count(key, len(body[i:i + 256 * 1024]))
            yield body[i:i + 256 * 1024]

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.ledger.body_bytes[key] += n


def _replace(headers: list[tuple[str, str]], changes: dict[str, str | None]) -> list[tuple[str, str]]:
    lowered = {name.lower() for name in changes}
    kept = [(h, v) for h, v in headers if h.lower() not in lowered]
    return kept + [(h, v) for h, v in changes.items() if v is not None]


class MisbehavingStore:
    """A small S3-like store of its own, for what moto cannot play: threaded, HTTP/1.1
    keep-alive, path-style HEAD and ranged GET, and one selectable misbehaviour per run.

    ``misbehaviour``: None (a well-behaved store), ``"trickle-head"`` (HEAD response headers
    one byte every ``seconds``), ``"drop-idle"`` (each connection closed after one response
    that did not say so, as a store or balancer dropping idle keep-alive connections does) or
    ``"stall-and-refuse"`` (GETs of ``stall.bin`` send their headers and 64 KiB, then nothing
    until the store stops; GETs of ``refused.bin`` answer 403) or ``"chunked-cut-once"`` (GETs
    answer chunked, without a length, as a proxy re-encoding bodies does; each object's first
    GET is cut inside its first chunk, the connection closed).
    ``close``: every response says ``Connection: close``, as moto's server does.
    Records ``(method, client port)`` per request, so a test can count TCP connections.
    """

    def __init__(self, objects: dict[str, bytes], misbehaviour: str | None = None,
                 seconds: float = 0.5, close: bool = False) -> None:
        if misbehaviour not in (None, "trickle-head", "drop-idle", "stall-and-refuse",
                                "chunked-cut-once"):
            raise ValueError(misbehaviour)
        chunked = misbehaviour == "chunked-cut-once"
        cut: set[str] = set()
        drop_idle = misbehaviour == "drop-idle"
        trickle_head = seconds if misbehaviour == "trickle-head" else 0.0
        stall_and_refuse = misbehaviour == "stall-and-refuse"
        import contextlib
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        stalling = threading.Event()
        store = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _object(self) -> bytes | None:
                store.requests.append((self.command, self.client_address[1]))
                key = self.path.lstrip("/").split("/", 1)[-1]
                body = objects.get(key)
                if body is None:
                    self._status_only(404)
                return body

            def _status_only(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _headers(self, status: int, body: bytes, length: int) -> None:
                self.send_response(status)
                if close:
                    self.send_header("Connection", "close")
                self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                self.send_header("Content-Length", str(length))
                self.send_header("Last-Modified", "Fri, 27 Nov 2026 00:00:00 GMT")

            def do_HEAD(self) -> None:
                body = self._object()
                if body is not None and trickle_head:
                    # Headers one byte at a time: every byte resets a socket timeout.
                    raw = (f"HTTP/1.1 200 OK\r\nETag: \"{hashlib.md5(body).hexdigest()}\"\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode()
                    with contextlib.suppress(OSError):
                        for i in range(len(raw)):
                            if store.stopping.is_set():
                                return
                            self.wfile.write(raw[i:i + 1])
                            self.wfile.flush()
                            time.sleep(trickle_head)
                    return
                if body is not None:
                    self._headers(200, body, len(body))
                    self.end_headers()
                self.close_connection = drop_idle or self.close_connection

            def do_GET(self) -> None:
                body = self._object()
                if body is None:
                    return
                if stall_and_refuse and self.path.endswith("/refused.bin"):
                    stalling.wait(10)  # refused while a stalled body is being read
                    self._status_only(403)
                    return
                start, end = 0, len(body) - 1
                if rng := self.headers.get("Range"):
                    first, last = rng.removeprefix("bytes=").split("-")
                    start, end = int(first), int(last)
                if chunked:
                    self.send_response(206 if rng else 200)
                    self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                    self.send_header("Transfer-Encoding", "chunked")
                    if rng:
                        self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                    self.end_headers()
                    part = body[start:end + 1]
                    if self.path not in cut:
                        cut.add(self.path)
                        self.wfile.write(b"%x\r\n" % len(part) + part[:len(part) // 2])
                        self.close_connection = True
                        return
                    for at in range(0, len(part), 1000):
                        piece = part[at:at + 1000]
                        self.wfile.write(b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n")
                    self.wfile.write(b"0\r\nX-Trailer: 1\r\n\r\n")
                    return
                self._headers(206 if rng else 200, body, end - start + 1)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                if stall_and_refuse and self.path.endswith("/stall.bin"):
                    with contextlib.suppress(OSError):
                        self.wfile.write(body[start:start + 64 * 1024])
                        self.wfile.flush()
                    stalling.set()
                    store.stopping.wait()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:end + 1])
                self.close_connection = drop_idle or self.close_connection

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> MisbehavingStore:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
