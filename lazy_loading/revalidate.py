"""Signed HEADs and GETs without botocore's request pipeline, read as botocore would parse them.

On a warm start every file is already here and only needs one HEAD to prove the object has not
changed; on a cold start of many small files, botocore's pipeline (request object, signer, HTTP
session) was about a third of each request's GIL time, and importing it a third of the CLI's
start. Building a boto3 client costs about 60 ms of CPU (parsing S3's 1.4 MB model and endpoint
rules), several times everything else a warm start does. For custom endpoints, where the URL is
simply ``<endpoint>/<bucket>/<key>`` (path style, as our clients use there), requests are signed
here (``sigv4``) and sent over one pool of keep-alive connections per repository
(``connections``).

This path can only skip work: a HEAD that gets anything but a 200 carrying an ETag and a length
returns None and the engine takes its normal path (client, HEAD with retries, download), which
then reports any error properly. An endpoint reached through a proxy takes the client path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .checksums import pick_s3_checksum
from .client import ERROR_BODY_LIMIT, S3ClientFactory, describe_endpoint, timeouts
from .config import LazyLoadingRepository
from .connections import ConnectFailure, HostConnections
from .plan import FileTransfer
from .s3io import NO_ETAG, NO_LENGTH, ByteRange, FatalFailure, RemoteObject
from .settings import LazyLoadingSettings
from .sigv4 import SigV4Signer, host_header

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

logger = logging.getLogger("lazy_loading")

NEARBY_SECONDS = 0.005  # a HEAD answered this fast: the store is on this machine or next to it
_CHECKSUM_HEADERS = {"ChecksumCRC64NVME": "x-amz-checksum-crc64nvme",
                     "ChecksumCRC32C": "x-amz-checksum-crc32c",
                     "ChecksumCRC32": "x-amz-checksum-crc32",
                     "ChecksumSHA256": "x-amz-checksum-sha256",
                     "ChecksumSHA1": "x-amz-checksum-sha1"}


class _SignedSession:
    """Signed HEADs and GETs to one repository over one keep-alive connection pool."""

    def __init__(self, repository: LazyLoadingRepository, clients: S3ClientFactory,
                 settings: LazyLoadingSettings) -> None:
        assert repository.endpoint_url is not None
        creds = clients.credentials_for(repository)
        self._repository = repository
        base = f"{repository.endpoint_url.rstrip('/')}/{repository.bucket_name}/"
        parts = urlsplit(base)
        self._host, self._prefix = host_header(base), parts.path
        self._origin = base[: len(base) - len(self._prefix)]  # scheme://host[:port]
        self._signer = SigV4Signer(
            creds.aws_access_key_id, creds.aws_secret_access_key.get_secret_value(),
            creds.aws_session_token.get_secret_value() if creds.aws_session_token else None,
            clients.region_for(repository) or "us-east-1",
        )
        connect, read = timeouts(settings)
        self._connections = HostConnections(
            parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
            _tls(clients.verify_for(repository)) if parts.scheme == "https" else None,
            connect, read, settings.max_connections)

    def _send(self, method: str, key: str, headers: dict[str, str]) -> Any:
        """One request, its body not read; connection and HTTP errors become botocore's, so
        the engine classifies them the same whichever path sent the request. An error status
        is read to at most ``ERROR_BODY_LIMIT`` and its connection dropped, never drained."""
        path = self._prefix + quote(key, safe="/~")
        try:
            response = self._connections.request(
                method, path, self._signer.sign_path(method, self._host, path, headers))
        except Exception as exc:
            raise _as_botocore_error(exc, self._origin + path) from None
        if response.status >= 300:
            try:
                body = response.read(ERROR_BODY_LIMIT) or b""
            except Exception:
                body = b""
            finally:
                response.close()
            raise _client_error(response.status, body, response.headers)
        return response

    def head(self, key: str) -> RemoteObject | FatalFailure | None:
        """The object, a failure no retry can mend (a 200 without what a download needs), or
        None for anything the normal path must retry or report (errors, non-200s)."""
        try:
            response = self._send("HEAD", key, {"x-amz-checksum-mode": "ENABLED"})
            response.release_conn()
        except Exception as exc:  # any failure: the normal path retries and reports it
            logger.debug("quick HEAD of %s failed (%s)", key, type(exc).__name__)
            return None
        if response.status != 200:
            return None
        headers = response.first
        etag, length = headers.get("etag"), headers.get("content-length")
        where = f"s3://{self._repository.bucket_name}/{key} at {describe_endpoint(self._repository)}"
        if not etag:
            return FatalFailure(f"{where}: {NO_ETAG}")
        if length is None or not length.isdigit():
            return FatalFailure(f"{where}: {NO_LENGTH}")
        fields: dict[str, object] = {name: headers.get(header)
                                     for name, header in _CHECKSUM_HEADERS.items()}
        fields.update(ETag=etag, ChecksumType=headers.get("x-amz-checksum-type"))
        modified = headers.get("last-modified")
        try:  # the form botocore's parsed HEAD gives, which the GETs are compared against
            last_modified = _http_date(modified) if modified else None
        except (ValueError, TypeError):
            return None
        return RemoteObject(endpoint=describe_endpoint(self._repository),
                            bucket=self._repository.bucket_name, key=key, size=int(length),
                            etag=etag, version_id=headers.get("x-amz-version-id"),
                            checksum=pick_s3_checksum(fields), last_modified=last_modified)

    def get(self, remote: RemoteObject, byte_range: ByteRange, whole: bool
            ) -> tuple[dict[str, Any], Any]:
        """GET one range pinned to the HEAD's ETag, streamed: the response fields as botocore's
        ``get_object`` parses them, and the body (the pooled response, unread). An error status
        becomes the ``ClientError`` botocore would raise, so it is classified the same."""
        headers = {"If-Match": remote.etag}
        if not whole:
            headers["Range"] = f"bytes={byte_range.start}-{byte_range.end}"
        response = self._send("GET", remote.key, headers)
        fields = response.first
        length = fields.get("content-length")
        modified = fields.get("last-modified")
        parsed: dict[str, Any] = {
            "ETag": fields.get("etag"),
            "ContentLength": int(length) if length and length.isdigit() else None,
            "ContentRange": fields.get("content-range"),
        }
        if modified and not parsed["ETag"]:  # only compared without an ETag (``s3io``)
            with contextlib.suppress(ValueError, TypeError):
                parsed["LastModified"] = _http_date(modified)
        return parsed, response

    def close(self) -> None:
        self._connections.close()


def _as_botocore_error(exc: Exception, url: str) -> Exception:
    """What botocore raises for the same failure, so ``s3io.classify`` treats both paths
    alike. The URL carries no query, hence no signature. botocore's errors are imported here,
    on a failure: a run that has none does not pay for them."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        ReadTimeoutError,
        SSLError,
    )

    error: Exception
    if isinstance(exc, ConnectFailure):
        cause = exc.cause
        if isinstance(cause, ssl.SSLError):
            error = SSLError(endpoint_url=url, error=cause)
        elif isinstance(cause, TimeoutError):
            error = ConnectTimeoutError(endpoint_url=url, error=cause)
        else:
            error = EndpointConnectionError(endpoint_url=url, error=cause)
    elif isinstance(exc, TimeoutError):
        error = ReadTimeoutError(endpoint_url=url, error=exc)
    elif isinstance(exc, OSError):  # http11's ProtocolError too
        error = ConnectionClosedError(endpoint_url=url, error=exc)
    else:
        error = HTTPClientError(error=exc)
    return error


def _tls(verify: bool | str | None) -> ssl.SSLContext:
    """The TLS context for what ``S3ClientFactory.verify_for`` says, as botocore applies it:
    no verification, a CA bundle (file or directory), or certifi's bundle (else the one
    botocore ships)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        return (ssl.create_default_context(capath=verify) if os.path.isdir(verify)
                else ssl.create_default_context(cafile=verify))
    try:
        from certifi import where
        bundle = where()
    except ImportError:
        import botocore

        bundle = os.path.join(os.path.dirname(botocore.__file__), "cacert.pem")
    return ssl.create_default_context(cafile=bundle)


def _proxied(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (as botocore reads it)."""
    if sys.platform not in ("darwin", "win32") and not any(
            name[-6:].lower() == "_proxy" for name in os.environ):
        # Here urllib reads proxies from ``*_proxy`` variables only; importing it costs about
        # a tenth of a warm start.
        return False
    from urllib.request import getproxies, proxy_bypass

    if not getproxies().get(url.split(":", 1)[0].lower()):  # botocore reads no ALL_PROXY
        return False
    try:
        return not proxy_bypass(url.split("://", 1)[-1].split("/", 1)[0])
    except (TypeError, OSError):
        return True


_IMF_FIXDATE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) "
                          r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([0-9]{4}) "
                          r"([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT")
_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _http_date(value: str) -> str:
    """``Last-Modified`` as ``str`` of the datetime botocore parses from it: the only form
    compared. The date every S3 server sends (RFC 9110's IMF-fixdate) is read here; anything
    else (or an impossible date) goes to the ``email`` package's parser, then botocore's.
    Importing ``email.utils`` and ``datetime`` was 3-4 ms of every start."""
    match = _IMF_FIXDATE.fullmatch(value)
    if match is not None:
        day, month_name, year, hour, minute, second = match.groups()
        month = _MONTHS[month_name]
        year_number = int(year)
        leap = year_number % 4 == 0 and (year_number % 100 != 0 or year_number % 400 == 0)
        days = 28 if month == 2 and not leap else _MONTH_DAYS[month - 1]
        if (year_number >= 1000 and 1 <= int(day) <= days and int(hour) < 24 and int(minute) < 60
                and int(second) < 60):
            return f"{year}-{month:02d}-{day} {hour}:{minute}:{second}+00:00"
    return _parsed_http_date(value)


def _parsed_http_date(value: str) -> str:
    from datetime import timezone
    from email.utils import parsedate_to_datetime

    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        from botocore.utils import parse_timestamp

        return str(parse_timestamp(value))
    return str(parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc))


_XML_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")


def _client_error(status: int, body: bytes, headers: Any) -> ClientError:
    from botocore.exceptions import ClientError

    match = _XML_CODE.search(body[:ERROR_BODY_LIMIT])
    code = match.group(1).decode("utf-8", "replace") if match else str(status)
    return ClientError({"Error": {"Code": code},
                        "ResponseMetadata": {"HTTPStatusCode": status,
                                             "HTTPHeaders": {k.lower(): v
                                                             for k, v in headers.items()}}},
                       "GetObject")


class SignedRequests:
    """Signed requests for repositories with an ``endpointUrl``, one connection pool each,
    shared by the HEADs and the GETs: no boto3 client is built unless a request needs the
    client path (an error status, or an AWS repository). The engine sends them from its I/O
    pool and closes them when it is done."""

    def __init__(self, transfers: list[FileTransfer], clients: S3ClientFactory,
                 settings: LazyLoadingSettings) -> None:
        self._sessions: dict[str, _SignedSession] = {}
        for t in transfers:
            rid, endpoint = t.repository.repository_id, t.repository.endpoint_url
            if endpoint is not None and rid not in self._sessions and not _proxied(endpoint):
                self._sessions[rid] = _SignedSession(t.repository, clients, settings)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()

    def session_for(self, repository: LazyLoadingRepository) -> _SignedSession | None:
        """GETs go the same way, for repositories with an ``endpointUrl``."""
        return self._sessions.get(repository.repository_id)

    def head(self, transfer: FileTransfer) -> RemoteObject | FatalFailure | None:
        session = self._sessions.get(transfer.repository.repository_id)
        if session is None:
            return None
        try:
            return session.head(transfer.spec.remote_path)
        except Exception as exc:  # the normal path reports whatever this was
            logger.debug("quick HEAD failed (%s)", type(exc).__name__)
            return None


_Head = Callable[[FileTransfer], RemoteObject | None]


def head_without_client(
    transfers: list[FileTransfer], clients: S3ClientFactory, settings: LazyLoadingSettings,
    timed: Callable[[_Head], _Head] = lambda head: head,
) -> list[RemoteObject] | None:
    """Every transfer's object as a plain signed HEAD sees it, or None when that cannot be
    had cheaply (an AWS endpoint, an error, a non-200): then use the normal path. Each HEAD
    goes through ``timed``, so that a warm start that finds a change still tells the GETs
    after it how near the store is."""
    if not transfers or any(t.repository.endpoint_url is None for t in transfers):
        return None
    requests: SignedRequests | None = None
    try:
        requests = SignedRequests(transfers, clients, settings)

        @timed
        def head(t: FileTransfer) -> RemoteObject | None:
            assert requests is not None
            found = requests.head(t)
            return found if isinstance(found, RemoteObject) else None

        # The first answer tells how far the store is: a nearby one answers the rest sooner
        # over the one warm connection than threads contending for the GIL would.
        started = time.monotonic()
        found = [head(transfers[0])]
        if found[0] is None:
            return None
        rest = transfers[1:]
        if time.monotonic() - started < NEARBY_SECONDS or len(rest) <= 1:
            found += map(head, rest)
        else:
            workers = min(len(rest), settings.max_connections)
            with ThreadPoolExecutor(workers, thread_name_prefix="lazy-loading-head") as pool:
                found += pool.map(head, rest)
    except Exception as exc:  # e.g. an unreadable CA bundle: the client path reports it
        logger.debug("no HEAD without a client (%s)", type(exc).__name__)
        return None
    finally:
        if requests is not None:
            requests.close()
    if any(remote is None for remote in found):
        return None
    return [remote for remote in found if remote is not None]
