"""One boto3 S3 client per repository per process, created lazily and never reused after fork.

A client's pooled sockets are shared with a forked child and yield other processes' bodies, so
the cache is keyed by PID and also cleared in the child by ``os.register_at_fork``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from .config import LazyLoadingConfig, LazyLoadingRepository, S3Credentials
from .settings import LazyLoadingSettings

_DEFAULT_REGION = "us-east-1"
_AMBIENT_ENDPOINTS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

logger = logging.getLogger("lazy_loading")


def _quiet_insecure_warnings() -> None:
    """urllib3 warns on every unverified request; the user opted out, and one line says so.
    Imported here: only a boto3 client, built after this, uses urllib3 (about 30 ms to import)."""
    from urllib3.exceptions import InsecureRequestWarning

    warnings.filterwarnings("ignore", category=InsecureRequestWarning)


def describe_endpoint(repository: LazyLoadingRepository) -> str:
    return repository.endpoint_url or "AWS S3"


def timeouts(settings: LazyLoadingSettings) -> tuple[float, float]:
    """(connect, read) seconds; a read that waits longer than the stall timeout is a stall."""
    return min(10.0, settings.stall_timeout), settings.stall_timeout


class S3ClientFactory:
    """Builds and caches clients; ``get`` is thread-safe and fork-safe."""

    def __init__(
        self,
        config: LazyLoadingConfig,
        settings: LazyLoadingSettings,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._settings = settings
        self._environ = os.environ if environ is None else environ
        # Here rather than per client: warm starts send their HEADs without building one.
        for repository in config.data.repositories:
            if not repository.verify_certificate:
                _quiet_insecure_warnings()
                logger.warning("TLS certificate verification is off for repository %s at %s "
                               "(verifyCertificate: false)", repository.repository_id,
                               describe_endpoint(repository))
        ambient = [n for n in _AMBIENT_ENDPOINTS if self._environ.get(n)]
        if ambient and any(r.endpoint_url is None for r in config.data.repositories):
            logger.warning("%s is set but not used: a repository without endpointUrl reads from "
                           "AWS S3; set endpointUrl on the repository to use another endpoint",
                           " and ".join(ambient))
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._clients: dict[str, Any] = {}
        self._session: Any = None  # boto3's, imported with the first client
        _live_factories.add(self)

    def get(self, repository: LazyLoadingRepository) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                self._forget()
            client = self._clients.get(repository.repository_id)
            if client is None:
                client = self._clients[repository.repository_id] = self._create(repository)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def _forget(self) -> None:
        # In a forked child: drop the parent's clients without closing their shared sockets.
        self._clients = {}
        self._session = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _create(self, repository: LazyLoadingRepository) -> Any:
        from botocore.config import Config  # boto3 costs ~60 ms to import: only when needed

        creds = self.credentials_for(repository)
        if self._session is None:
            self._session = _s3_session()
        settings = self._settings
        connect_timeout, read_timeout = timeouts(settings)
        boto_config = Config(
            max_pool_connections=settings.max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path" if repository.endpoint_url else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
            # A repository's endpoint is its endpointUrl, else AWS S3: never AWS_ENDPOINT_URL or
            # a profile's endpoint_url, which would receive the credentials unannounced.
            ignore_configured_endpoint_urls=True,
        )
        client = self._session.client(
            "s3",
            aws_access_key_id=creds.aws_access_key_id,
            aws_secret_access_key=creds.aws_secret_access_key.get_secret_value(),
            aws_session_token=(
                creds.aws_session_token.get_secret_value() if creds.aws_session_token else None
            ),
            region_name=self.region_for(repository),
            endpoint_url=repository.endpoint_url,
            verify=self.verify_for(repository),
            config=boto_config,
        )
        cap_error_bodies(client._endpoint.http_session)
        return client

    def credentials_for(self, repository: LazyLoadingRepository) -> S3Credentials:
        return self._config.credentials_for(repository)

    def region_for(self, repository: LazyLoadingRepository) -> str | None:
        creds = self.credentials_for(repository)
        return repository.region or creds.region or self._default_region(repository)

    def _default_region(self, repository: LazyLoadingRepository) -> str | None:
        env_region = self._environ.get("AWS_REGION") or self._environ.get("AWS_DEFAULT_REGION")
        if env_region:
            return env_region
        return _DEFAULT_REGION if repository.endpoint_url else None

    def verify_for(self, repository: LazyLoadingRepository) -> bool | str | None:
        """TLS verification as boto3 takes it: False, a CA bundle path, or None (its default)."""
        if not repository.verify_certificate:
            return False
        if repository.ca_bundle:
            return repository.ca_bundle
        return self._environ.get("AWS_CA_BUNDLE") or None


ERROR_BODY_LIMIT = 64 * 1024


def cap_error_bodies(session: Any) -> None:
    """Read at most ``ERROR_BODY_LIMIT`` bytes of an error response.

    botocore reads a whole error body into memory to parse its code, and a store (or a proxy)
    can send hundreds of MiB there. No public hook runs between receiving the response and
    reading its body, so the HTTP session (a client's, or the engine's signed one) is wrapped:
    for a status >= 300 the body's first bytes are read here and the connection is dropped
    rather than drained.
    """
    send = session.send

    def send_capped(request: Any) -> Any:
        response = send(request)
        if response.status_code >= 300 and response.raw is not None:
            try:
                response._content = response.raw.read(ERROR_BODY_LIMIT) or b""
            finally:
                with contextlib.suppress(Exception):
                    response.raw.close()
        return response

    session.send = send_capped


def _s3_session() -> Any:
    """One session per process, shared by every repository's client: the parsed S3 model
    (about 40 ms to load) is then loaded once, not once per repository."""
    import boto3.session
    import botocore.session
    from botocore.loaders import Loader

    class _S3ModelLoader(Loader):  # type: ignore[misc]
        """botocore's loader, minus its scan of every service directory.

        Before loading any model botocore lists all ~400 service directories (about 900
        ``listdir`` calls, 30 ms per process) only to check that the name is known; we only
        ever load S3.
        """

        def list_available_services(self, type_name: str) -> list[str]:
            return ["s3"]

    core = botocore.session.Session()
    data_path = core.get_config_variable("data_path") or ""
    core.register_component("data_loader", _S3ModelLoader(
        extra_search_paths=[p for p in data_path.split(os.pathsep) if p]))
    return boto3.session.Session(botocore_session=core)


_live_factories: weakref.WeakSet[S3ClientFactory] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for factory in _live_factories:
        factory._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
