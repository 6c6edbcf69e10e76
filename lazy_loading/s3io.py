"""Blocking S3 I/O for one request: HEAD an object, or stream one byte range into a file.

These functions run in worker threads; scheduling, retries and cancellation policy live in
``engine``. Every error they raise is classified (transient, fatal, object changed) and names the
endpoint, bucket and key, never a credential.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .checksums import DigestSet, pick_s3_checksum
from .http11 import Response
from .redact import one_line
from .splice import SplicedBody, Unsupported, pwrite_all, spliced

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

# Each buffer's bytes are written with one pwrite and checked with one CRC call, and each of
# those gives up the GIL, which 16 I/O threads then queue for: 4 MiB took 16 x 32 MiB from 0.48 to
# 0.41-0.45 s on 2 cores (2-3 MiB did as well, 8 MiB worse). A thread's buffer grows to this
# size only when its parts need it, so small files keep small buffers.
READ_SIZE = 4 * 1024 * 1024
_MIN_BUFFER = 256 * 1024

_RETRYABLE_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestTimeTooSkewed", "TooManyRequests", "BadDigest",
}


@dataclass(frozen=True)
class RemoteObject:
    """What HEAD told us; every later GET is pinned to ``etag`` with If-Match."""

    endpoint: str
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None
    checksum: tuple[str, str] | None = None
    last_modified: str | None = None

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key} at {self.endpoint}"


@dataclass(frozen=True)
class ByteRange:
    index: int
    start: int
    end: int  # inclusive, as in HTTP Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class TransferFailure(Exception):
    """Base for classified request failures."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientFailure(TransferFailure):
    """Worth retrying: 5xx, throttling, resets, truncated or stalled bodies, lying headers.

    ``retry_after`` is the store's own ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, connect_failure: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.connect_failure = connect_failure
        self.retry_after = retry_after


class FatalFailure(TransferFailure):
    """Retrying cannot help: 400/403/404, unknown host, local I/O errors."""


class ObjectChanged(TransferFailure):
    """If-Match failed: the object was replaced since HEAD; the file must restart from scratch."""


class Cancelled(Exception):
    """Another part failed fatally or the deadline passed; stop reading promptly."""


_ERROR_CODE = re.compile(r"^[A-Za-z0-9.]{1,64}$")
def _status(exc: ClientError) -> tuple[int, str]:
    meta = exc.response.get("ResponseMetadata", {})
    code = str(exc.response.get("Error", {}).get("Code", "") or "")
    status = int(meta.get("HTTPStatusCode") or (int(code) if code.isdigit() else 0))
    return status, code if _ERROR_CODE.match(code) else ("" if not code else "(unreadable code)")


def _retry_after(exc: ClientError) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date is ignored)."""
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    value = str(headers.get("retry-after", "")).strip()
    return float(value) if value.isdigit() else None


def classify(exc: BaseException, where: str) -> TransferFailure:
    """Turn a botocore/urllib3/OS error into one of our failure kinds with a safe message."""
    if isinstance(exc, TransferFailure):
        return exc
    # botocore's errors can only come from botocore, which imported them: checked without
    # importing them (about 5 ms of every start) where nothing did.
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        failure = _classify_botocore(exc, where, botocore)
        if failure is not None:
            return failure
    if isinstance(exc, (ConnectionError, TimeoutError)) or _is_urllib3_error(exc):
        return TransientFailure(f"{where}: {type(exc).__name__}")
    if isinstance(exc, OSError):
        return FatalFailure(f"{where}: local I/O error: {one_line(exc.strerror or str(exc))}")
    return FatalFailure(f"{where}: unexpected {type(exc).__name__}")


def _classify_botocore(exc: BaseException, where: str, botocore: ModuleType
                       ) -> TransferFailure | None:
    """``classify`` for botocore's errors (``botocore`` is its loaded ``exceptions`` module);
    None for anything else."""
    if isinstance(exc, botocore.ClientError):
        status, code = _status(exc)
        label = f"HTTP {status} {code}".strip() if code and code != str(status) else f"HTTP {status}"
        if status == 412 or code == "PreconditionFailed":
            return ObjectChanged(f"{where}: object changed during download ({label})")
        if status >= 500 or status == 429 or code in _RETRYABLE_CODES:
            return TransientFailure(f"{where}: {label}", retry_after=_retry_after(exc))
        hint = {403: " (check the credentials and bucket policy)",
                404: " (no such object or bucket)"}.get(status, "")
        return FatalFailure(f"{where}: {label}{hint}")
    if isinstance(exc, botocore.SSLError):
        reason = str(getattr(exc, "kwargs", {}).get("error", "")) or "handshake failed"
        if "match" in reason.lower() and "hostname" in reason.lower():
            reason = "the certificate does not name this host"  # not the whole certificate
        hint = ("; set caBundle on the repository or AWS_CA_BUNDLE, or verifyCertificate: false"
                if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower() else "")
        return FatalFailure(f"{where}: TLS error: {one_line(_first_line(reason))}{hint}")
    if isinstance(exc, botocore.EndpointConnectionError):
        reason = str(getattr(exc, "kwargs", {}).get("error", "")) or type(exc).__name__
        if "Name or service not known" in reason or "nodename nor servname" in reason \
                or "Temporary failure in name resolution" in reason:
            return FatalFailure(f"{where}: cannot resolve the endpoint host")
        return TransientFailure(f"{where}: cannot connect to the endpoint", connect_failure=True)
    if isinstance(exc, botocore.ConnectTimeoutError):
        return TransientFailure(f"{where}: connect timed out", connect_failure=True)
    if isinstance(exc, botocore.ReadTimeoutError):
        return TransientFailure(f"{where}: stalled (no bytes within the read timeout)")
    if isinstance(exc, (botocore.ConnectionClosedError, botocore.IncompleteReadError,
                        botocore.ResponseStreamingError)):
        return TransientFailure(f"{where}: connection cut mid-body ({type(exc).__name__})")
    if isinstance(exc, botocore.BotoCoreError):
        return TransientFailure(f"{where}: {type(exc).__name__}")
    return None


def _is_urllib3_error(exc: BaseException) -> bool:
    """An urllib3 error can only come from a boto3 client, which imported urllib3: checked
    without importing it (about 30 ms) in a process that never builds one."""
    module = sys.modules.get("urllib3.exceptions")
    return module is not None and isinstance(exc, module.HTTPError)


def _first_line(text: str, limit: int = 200) -> str:
    return text.strip().splitlines()[0][:limit] if text.strip() else ""


NO_ETAG = "HEAD returned no ETag, so a download cannot be pinned to one version of the object"
NO_LENGTH = "HEAD returned no valid Content-Length"


def head_object(client: Any, endpoint: str, bucket: str, key: str) -> RemoteObject:
    """HEAD one object, asking for its full-object checksum too."""
    where = f"s3://{bucket}/{key} at {endpoint}"
    try:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as exc:
        raise classify(exc, where) from None
    etag = str(head.get("ETag") or "")
    if not etag:
        raise FatalFailure(f"{where}: {NO_ETAG}")
    size = head.get("ContentLength")
    if not isinstance(size, int) or size < 0:
        raise FatalFailure(f"{where}: {NO_LENGTH}")
    return RemoteObject(
        endpoint=endpoint,
        bucket=bucket,
        key=key,
        size=size,
        etag=etag,
        version_id=head.get("VersionId"),
        checksum=pick_s3_checksum(head),
        last_modified=str(head.get("LastModified") or "") or None,
    )


@dataclass(eq=False)
class RangeSink:
    """Where a file's bytes go: a descriptor written at offsets, plus optional inline digests.

    ``abort`` closes every body being read so threads blocked in a socket read stop at once
    instead of after the stall timeout.
    """

    fd: int
    on_bytes: Callable[[int], None]
    cancel: threading.Event
    digests: DigestSet | None = None
    _bodies: set[Any] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Ranges whose response carried neither ETag nor Last-Modified: nothing ties their bytes to
    # the version the HEAD saw, so only a checksum can.
    unproven: set[int] = field(default_factory=set)
    # Below ``min_rate`` bytes/s over ``rate_window`` seconds a connection counts as stalled,
    # however steadily its bytes trickle in (each one would reset a socket timeout).
    min_rate: int = 0
    rate_window: float = 30.0

    def track(self, body: Any) -> None:
        with self._lock:
            self._bodies.add(body)
            if self.cancel.is_set():
                _interrupt(body)

    def untrack(self, body: Any) -> None:
        with self._lock:
            self._bodies.discard(body)

    def abort(self) -> None:
        self.cancel.set()
        with self._lock:
            for body in self._bodies:
                _interrupt(body)

    def with_counter(self, on_bytes: Callable[[int], None],
                     digests: DigestSet | None = None) -> RangeSink:
        """The same sink (shared cancel and bodies) reporting bytes to ``on_bytes``, hashing
        into ``digests`` as well when given (a part's own CRC)."""
        return RangeSink(self.fd, on_bytes, self.cancel, digests or self.digests, self._bodies,
                         self._lock, self.unproven, self.min_rate, self.rate_window)


def _interrupt(body: Any) -> None:
    """Wake a thread blocked reading ``body`` by shutting its socket down.

    A 1 MiB read from a slow store can block for seconds, and ``body.close()`` from another
    thread would wait for the reader's buffer lock. ``shutdown`` works on a duplicate of the
    descriptor; callers hold the sink lock, so the reader cannot close it meanwhile.
    """
    try:
        fd = getattr(body, "_raw_stream", body).fileno()
    except (AttributeError, OSError, ValueError):
        return
    with contextlib.suppress(OSError), socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.shutdown(socket.SHUT_RDWR)


_local = threading.local()


def _buffer(wanted: int) -> memoryview:
    """One reusable read buffer per I/O thread, as large as its parts have needed (at most
    ``READ_SIZE``): no allocation per read."""
    size = max(_MIN_BUFFER, min(READ_SIZE, wanted))
    buf: memoryview | None = getattr(_local, "buffer", None)
    if buf is None or len(buf) < size:
        buf = _local.buffer = memoryview(bytearray(size))
    return buf


def _reader(body: Any) -> Callable[[memoryview], int]:
    """Read what the socket has (at most one ``recv``) into our buffer, without a copy.

    ``readinto1`` returns as soon as some bytes arrived, so progress moves while a slow store
    trickles and the rate rule can see it; a plain ``readinto`` would block until the whole
    buffer is full. A signed request's ``Response`` reads so itself. A botocore body is read
    straight from the ``http.client`` response under urllib3's (bare, or wrapped in botocore's
    ``StreamingBody``), keeping ``http.client``'s own Content-Length bookkeeping:
    ``StreamingBody.read`` and urllib3's ``readinto`` each allocate and copy every chunk, which
    on 2 cores costs more than the socket. Any other body (chunked, or to the close) is read
    with ``read``.
    """
    if isinstance(body, Response):
        if body.remaining is not None:
            return body.readinto1
    elif (client := sys.modules.get("http.client")) is not None:  # botocore imported it
        fp = getattr(getattr(body, "_raw_stream", body), "_fp", None)
        if (isinstance(fp, client.HTTPResponse)
                and not fp.chunked and fp.length is not None and hasattr(fp.fp, "readinto1")):
            def read_some(view: memoryview) -> int:
                want = min(len(view), fp.length or 0)
                if want <= 0 or fp.fp is None:
                    return 0
                n = int(fp.fp.readinto1(view[:want]))
                fp.length = (fp.length or 0) - n
                if n == 0 or fp.length == 0:  # as http.client at a body's end: the
                    fp._close_conn()  # connection is free again
                return n

            return read_some

    def read_into(view: memoryview) -> int:
        data = body.read(len(view))
        view[: len(data)] = data
        return len(data)

    return read_into


class _RateWindow:
    """Bytes over the last window; too few is a stall, whatever the socket timeout says."""

    def __init__(self, min_rate: int, window: float) -> None:
        self._min_bytes = min_rate * window
        self._window = window
        self._start = time.monotonic()
        self._bytes = 0

    def add(self, n: int, where: str) -> None:
        if not self._min_bytes:
            return
        self._bytes += n
        now = time.monotonic()
        if now - self._start >= self._window:
            if self._bytes < self._min_bytes:
                rate = self._bytes / (now - self._start)
                raise TransientFailure(
                    f"{where}: too slow ({rate:.0f} B/s over {now - self._start:.0f} s, below "
                    f"LAZY_LOADING_MIN_RATE={self._min_bytes / self._window:.0f} B/s)")
            self._start, self._bytes = now, 0


def _move_by_kernel(body: SplicedBody, sink: RangeSink, byte_range: ByteRange,
                    rate: _RateWindow, where: str) -> int:
    """The range's bytes moved into the file by ``splice``: all of them, or as many as it
    moved before it turned out unable to here (the caller reads the rest)."""
    written = 0
    while written < byte_range.length:
        if sink.cancel.is_set():
            raise Cancelled()
        try:
            n = body.move(sink.fd, byte_range.start + written, byte_range.length - written)
        except Unsupported:
            break
        if not n:
            raise TransientFailure(f"{where}: body ended after {written} of "
                                   f"{byte_range.length} bytes")
        sink.on_bytes(n)
        rate.add(n, where)
        written += n
    return written


def fetch_ranges(client: Any, remote: RemoteObject, pieces: Sequence[tuple[ByteRange, RangeSink]],
                 whole: bool = False, signed: Any = None,
                 on_piece: Callable[[], None] | None = None) -> tuple[float, float, int]:
    """GET consecutive ranges (``pieces``) with one request pinned to the HEAD's ETag and
    ``pwrite`` each at its offset, its bytes counted and hashed by its own sink, ``on_piece``
    called as each one is in.

    Lengths and Content-Range are checked against what we asked for: a store that lies is a
    transient failure, never published. ``whole`` fetches without a Range header (single-part
    files), which lets us hash the body inline in order.

    A piece is done only once every byte of it has been written; a failure after that leaves
    the done pieces done, so a retry asks only for the rest. Returns how long the store took
    to answer, then to send the body, and the body's length.
    """
    first, sink = pieces[0]
    span_end = pieces[-1][0]
    span = first if len(pieces) == 1 else ByteRange(first.index, first.start, span_end.end)
    where = remote.where
    params: dict[str, Any] = {"Bucket": remote.bucket, "Key": remote.key, "IfMatch": remote.etag}
    if not whole:
        params["Range"] = f"bytes={span.start}-{span.end}"
    body = None
    complete = False
    asked = time.monotonic()
    try:
        if sink.cancel.is_set():
            raise Cancelled()
        if signed is not None:
            response, body = signed.get(remote, span, whole)
        else:
            response = client.get_object(**params)
            body = response["Body"]
        answered = time.monotonic()
        sink.track(body)
        if not _check_headers(response, remote, span, whole, where):
            with sink._lock:
                sink.unproven.update(byte_range.index for byte_range, _ in pieces)
        read_into = _reader(body)
        rate = _RateWindow(sink.min_rate, sink.rate_window)
        spliced_body = (spliced(body) if all(piece_sink.digests is None
                                             for _, piece_sink in pieces) else None)
        kernel = spliced_body
        try:
            buffer: memoryview | None = None
            for byte_range, piece_sink in pieces:
                written = 0
                if kernel is not None:
                    written = _move_by_kernel(kernel, piece_sink, byte_range, rate, where)
                if written < byte_range.length:
                    kernel = None  # it could not move them all: the body is read from here on
                    buffer = buffer or _buffer(span.end - byte_range.start + 1 - written)
                    _read_range(read_into, buffer, piece_sink, byte_range, written, rate, where)
                if on_piece is not None and byte_range is not span_end:
                    on_piece()
        finally:
            if spliced_body is not None:
                spliced_body.close()
        if read_into((buffer or _buffer(1))[:1]):
            if whole and remote.size == 0:
                raise FatalFailure(f"{where}: HEAD said 0 bytes but the body is not empty; the "
                                   "store or a proxy misreports the size")
            raise TransientFailure(f"{where}: body longer than {span.length} bytes")
        if on_piece is not None:  # the last piece is done once nothing follows it
            on_piece()
        complete = True
        return answered - asked, time.monotonic() - answered, span.length
    except (Cancelled, TransferFailure):
        raise
    except Exception as exc:
        if sink.cancel.is_set():
            raise Cancelled() from None
        raise classify(exc, where) from None
    finally:
        if body is not None:
            sink.untrack(body)
            _finish_body(body, reuse=complete)


def _read_range(read_into: Callable[[memoryview], int], buffer: memoryview, sink: RangeSink,
                byte_range: ByteRange, written: int, rate: _RateWindow, where: str) -> None:
    """The rest of ``byte_range`` from ``written`` on, read through ``buffer``: each buffer
    filled from as many reads as it takes, then written with one ``pwrite``."""
    offset, chunk_size = byte_range.start + written, len(buffer)
    while written < byte_range.length:
        want, filled = min(chunk_size, byte_range.length - written), 0
        while filled < want:
            if sink.cancel.is_set():
                raise Cancelled()
            n = read_into(buffer[filled:want])
            if not n:
                raise TransientFailure(f"{where}: body ended after {written + filled} of "
                                       f"{byte_range.length} bytes")
            filled += n
            sink.on_bytes(n)
            rate.add(n, where)
        chunk = buffer[:filled]
        pwrite_all(sink.fd, chunk, offset)
        if sink.digests is not None:
            sink.digests.update(chunk)
        offset += filled
        written += filled


def _finish_body(body: Any, reuse: bool) -> None:
    """Return a fully read body's connection to the pool; close anything else.

    Reading through ``http.client`` directly bypasses urllib3's own release on EOF, and
    ``close`` would drop the connection: every part would then pay a new TCP (and TLS)
    handshake.
    """
    raw = getattr(body, "_raw_stream", body)
    if reuse and hasattr(raw, "release_conn"):
        raw.release_conn()
    body.close()


def _check_headers(response: dict[str, Any], remote: RemoteObject, byte_range: ByteRange,
                   whole: bool, where: str) -> bool:
    """Check a GET's headers against the HEAD; True when they prove it is the same version.

    A store that ignores ``If-Match`` would otherwise serve a newer object's ranges into an
    older one's file: the ETag is compared, else Last-Modified, and the total size always.
    """
    length = response.get("ContentLength")
    if length is not None and int(length) != byte_range.length:
        if whole and remote.size == 0:
            raise FatalFailure(f"{where}: HEAD said 0 bytes but GET sends {length}; the store "
                               "or a proxy misreports the size")
        raise TransientFailure(
            f"{where}: Content-Length {length} but {byte_range.length} bytes were requested"
        )
    if not whole:
        expected = f"bytes {byte_range.start}-{byte_range.end}/{remote.size}"
        got = response.get("ContentRange")
        if got != expected:
            raise TransientFailure(f"{where}: Content-Range {got!r}, expected {expected!r}")
    etag = response.get("ETag")
    if etag:
        if etag != remote.etag:
            raise ObjectChanged(f"{where}: ETag changed from {remote.etag} to {etag}")
        return True
    modified = response.get("LastModified")
    if modified is not None and remote.last_modified:
        if str(modified) != remote.last_modified:
            raise ObjectChanged(f"{where}: Last-Modified changed from {remote.last_modified} "
                                f"to {modified}")
        return True
    return False
