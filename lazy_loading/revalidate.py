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

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.httpsession import URLLib3Session
from botocore.utils import get_environ_proxies, parse_timestamp

from .checksums import pick_s3_checksum
from .client import S3ClientFactory, describe_endpoint, timeouts
from .config import LazyLoadingRepository
from .plan import FileTransfer
from .s3io import NO_ETAG, NO_LENGTH, FatalFailure, RemoteObject
from .settings import LazyLoadingSettings

logger = logging.getLogger("lazy_loading")

_NEARBY_SECONDS = 0.005
_CHECKSUM_HEADERS = {"ChecksumCRC64NVME": "x-amz-checksum-crc64nvme",
                     "ChecksumCRC32C": "x-amz-checksum-crc32c",
                     "ChecksumCRC32": "x-amz-checksum-crc32",
                     "ChecksumSHA256": "x-amz-checksum-sha256",
                     "ChecksumSHA1": "x-amz-checksum-sha1"}


class _SignedHead:
    """Signed HEAD requests to one repository over one keep-alive connection pool."""

    def __init__(self, repository: LazyLoadingRepository, clients: S3ClientFactory,
                 settings: LazyLoadingSettings, share_client_pool: bool) -> None:
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
        self._owned = not share_client_pool
        if share_client_pool:
            self._http = clients.http_session_for(repository)
            return
        verify = clients.verify_for(repository)
        self._http = URLLib3Session(
            verify=True if verify is None else verify,
            proxies=get_environ_proxies(repository.endpoint_url),
            timeout=timeouts(settings),
            max_pool_connections=settings.max_connections,
        )

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
            last_modified = str(parse_timestamp(modified)) if modified else None
        except (ValueError, TypeError):
            return None
        return RemoteObject(endpoint=describe_endpoint(self._repository),
                            bucket=self._repository.bucket_name, key=key, size=int(length),
                            etag=etag, version_id=response.headers.get("x-amz-version-id"),
                            checksum=pick_s3_checksum(fields), last_modified=last_modified)

    def close(self) -> None:
        if self._owned:
            self._http.close()


class SignedHeads:
    """Cold-start HEADs over each client's own connections (which the GETs then reuse), for
    repositories with an ``endpointUrl``; the engine sends them from its I/O pool."""

    def __init__(self, transfers: list[FileTransfer], clients: S3ClientFactory,
                 settings: LazyLoadingSettings) -> None:
        self._sessions = {t.repository.repository_id: _SignedHead(t.repository, clients,
                                                                  settings, True)
                          for t in transfers if t.repository.endpoint_url is not None}

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
    sessions: dict[str, _SignedHead] = {}
    try:
        for t in transfers:
            rid = t.repository.repository_id
            if rid not in sessions:
                sessions[rid] = _SignedHead(t.repository, clients, settings, False)

        def head(t: FileTransfer) -> RemoteObject | None:
            found = sessions[t.repository.repository_id].head(t.spec.remote_path)
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
        for session in sessions.values():
            session.close()
    if any(remote is None for remote in found):
        return None
    return [remote for remote in found if remote is not None]
