"""HEADs without botocore's request pipeline: signed, sent, and read as botocore would parse them.

On a warm start every file is already here and only needs one HEAD to prove the object has not
changed; on a cold start of many small files, botocore's pipeline was about a fifth of the GIL
time of each HEAD. Building a boto3 client costs about 60 ms of CPU (parsing S3's 1.4 MB model and
endpoint rules), several times everything else a warm start does. For custom endpoints, where
the URL is simply ``<endpoint>/<bucket>/<key>`` (path style, as our clients use there),
botocore's own SigV4 signer and HTTP session send those HEADs without the model.

This path can only skip work: anything but a 200 carrying an ETag and a length returns None and
the engine takes its normal path (client, HEAD with retries, download), which then reports any
error properly.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.httpsession import URLLib3Session
from botocore.response import StreamingBody
from botocore.utils import get_environ_proxies, parse_timestamp

from .checksums import pick_s3_checksum
from .client import (
    ERROR_BODY_LIMIT,
    S3ClientFactory,
    cap_error_bodies,
    describe_endpoint,
    timeouts,
)
from .config import LazyLoadingRepository
from .plan import FileTransfer
from .s3io import NO_ETAG, NO_LENGTH, ByteRange, FatalFailure, RemoteObject
from .settings import LazyLoadingSettings

logger = logging.getLogger("lazy_loading")

_NEARBY_SECONDS = 0.005
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
        self._base = f"{repository.endpoint_url.rstrip('/')}/{repository.bucket_name}/"
        self._signer = S3SigV4Auth(
            Credentials(creds.aws_access_key_id, creds.aws_secret_access_key.get_secret_value(),
                        creds.aws_session_token.get_secret_value()
                        if creds.aws_session_token else None),
            "s3", clients.region_for(repository) or "us-east-1",
        )
        verify = clients.verify_for(repository)
        self._http = URLLib3Session(
            verify=True if verify is None else verify,
            proxies=get_environ_proxies(repository.endpoint_url),
            timeout=timeouts(settings),
            max_pool_connections=settings.max_connections,
        )
        cap_error_bodies(self._http)

    def head(self, key: str) -> RemoteObject | FatalFailure | None:
        """The object, a failure no retry can mend (a 200 without what a download needs), or
        None for anything the normal path must retry or report (errors, non-200s)."""
        request = AWSRequest(method="HEAD", url=self._base + quote(key, safe="/~"),
                             headers={"x-amz-checksum-mode": "ENABLED"})
        self._signer.add_auth(request)
        try:
            response = self._http.send(request.prepare())
        except Exception as exc:  # any failure: the normal path retries and reports it
            logger.debug("quick HEAD of %s failed (%s)", key, type(exc).__name__)
            return None
        if response.status_code != 200:
            return None
        etag, length = response.headers.get("ETag"), response.headers.get("Content-Length")
        where = f"s3://{self._repository.bucket_name}/{key} at {describe_endpoint(self._repository)}"
        if not etag:
            return FatalFailure(f"{where}: {NO_ETAG}")
        if length is None or not length.isdigit():
            return FatalFailure(f"{where}: {NO_LENGTH}")
        fields: dict[str, object] = {name: response.headers.get(header)
                                     for name, header in _CHECKSUM_HEADERS.items()}
        fields.update(ETag=etag, ChecksumType=response.headers.get("x-amz-checksum-type"))
        modified = response.headers.get("Last-Modified")
        try:  # the form botocore's parsed HEAD gives, which the GETs are compared against
            last_modified = str(_http_date(modified)) if modified else None
        except (ValueError, TypeError):
            return None
        return RemoteObject(endpoint=describe_endpoint(self._repository),
                            bucket=self._repository.bucket_name, key=key, size=int(length),
                            etag=etag, version_id=response.headers.get("x-amz-version-id"),
                            checksum=pick_s3_checksum(fields), last_modified=last_modified)

    def get(self, remote: RemoteObject, byte_range: ByteRange, whole: bool
            ) -> tuple[dict[str, Any], StreamingBody]:
        """GET one range pinned to the HEAD's ETag, streamed: the response fields and body as
        botocore's ``get_object`` returns them, so ``fetch_range`` treats both alike. An error
        status becomes the ``ClientError`` botocore would raise, so it is classified the same."""
        headers = {"If-Match": remote.etag}
        if not whole:
            headers["Range"] = f"bytes={byte_range.start}-{byte_range.end}"
        request = AWSRequest(method="GET", url=self._base + quote(remote.key, safe="/~"),
                             headers=headers)
        self._signer.add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True
        response = self._http.send(prepared)
        fields = response.headers
        if response.status_code not in (200, 206):
            with contextlib.suppress(Exception):
                response.raw.close()
            raise _client_error(response.status_code, response.content or b"", fields)
        length = fields.get("Content-Length")
        modified = fields.get("Last-Modified")
        parsed: dict[str, Any] = {
            "ETag": fields.get("ETag"),
            "ContentLength": int(length) if length and length.isdigit() else None,
            "ContentRange": fields.get("Content-Range"),
        }
        if modified:
            with contextlib.suppress(ValueError, TypeError):
                parsed["LastModified"] = _http_date(modified)
        return parsed, StreamingBody(response.raw, parsed["ContentLength"])

    def close(self) -> None:
        self._http.close()


_XML_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")


def _http_date(value: str) -> datetime:
    """``Last-Modified`` as botocore parses it, at a fraction of the cost: dateutil's parser
    took about a fifth of a small object's request time. Anything unusual goes to botocore."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        fallback: datetime = parse_timestamp(value)
        return fallback
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _client_error(status: int, body: bytes, headers: Any) -> ClientError:
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
            rid = t.repository.repository_id
            if t.repository.endpoint_url is not None and rid not in self._sessions:
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


def head_without_client(transfers: list[FileTransfer], clients: S3ClientFactory,
                        settings: LazyLoadingSettings) -> list[RemoteObject] | None:
    """Every transfer's object as a plain signed HEAD sees it, or None when that cannot be
    had cheaply (an AWS endpoint, an error, a non-200): then use the normal path."""
    if not transfers or any(t.repository.endpoint_url is None for t in transfers):
        return None
    requests: SignedRequests | None = None
    try:
        requests = SignedRequests(transfers, clients, settings)

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
        if time.monotonic() - started < _NEARBY_SECONDS or len(rest) <= 1:
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
