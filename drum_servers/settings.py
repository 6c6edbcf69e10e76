"""Server settings read from the environment (DRUM's names where DRUM has one)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lazy_loading import ConfigError
from lazy_loading.environ import register_known
from lazy_loading.settings import parse_size


class ReadinessMode(str, Enum):
    BLOCKING = "blocking"
    BACKGROUND = "background"


class WorkerClass(str, Enum):
    GTHREAD = "gthread"
    SYNC = "sync"
    GEVENT = "gevent"

    @property
    def gunicorn_name(self) -> str:
        return "drum_servers.workers.ThreadWorker" if self is WorkerClass.GTHREAD else self.value


_ENV_NAMES = {
    "code_dir": "CODE_DIR",
    "mode": "LAZY_LOADING_MODE",
    "url_prefix": "URL_PREFIX",
    "address": "ADDRESS",
    "workers": "MAX_WORKERS",
    "worker_class": "DRUM_GUNICORN_WORKER_CLASS",
    "timeout": "DRUM_GUNICORN_TIMEOUT",
    "graceful_timeout": "DRUM_GUNICORN_GRACEFUL_TIMEOUT",
    "keepalive": "DRUM_GUNICORN_KEEP_ALIVE",
    "max_requests": "DRUM_GUNICORN_MAX_REQUESTS",
    "max_requests_jitter": "DRUM_GUNICORN_MAX_REQUESTS_JITTER",
    "worker_connections": "DRUM_GUNICORN_WORKER_CONNECTIONS",
    "threads": "DRUM_GUNICORN_THREADS",
    "read_timeout": "DRUM_GUNICORN_READ_TIMEOUT",
    "max_concurrent_predictions": "MAX_CONCURRENT_PREDICTIONS",
    "max_request_body": "MAX_REQUEST_BODY_BYTES",
    "info_details": "INFO_DETAILS",
    "with_error_server": "WITH_ERROR_SERVER",
    "backlog": "DRUM_GUNICORN_BACKLOG",
    "failure_exit_delay": "LAZY_LOADING_FAILURE_EXIT_DELAY",
}


register_known(_ENV_NAMES.values())

_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")


class ServerSettings(BaseModel):
    """Every server knob; the README's configuration table documents each env var."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code_dir: Path = Field(default_factory=Path.cwd)
    mode: ReadinessMode = ReadinessMode.BLOCKING
    url_prefix: str = ""
    address: str = "0.0.0.0:8080"
    workers: int = Field(1, ge=1, le=64)
    worker_class: WorkerClass = WorkerClass.GTHREAD
    timeout: int = Field(120, ge=1, le=3600)
    graceful_timeout: int = Field(30, ge=1, le=3600)
    keepalive: int = Field(5, ge=0, le=3600)
    max_requests: int = Field(0, ge=0, le=10_000_000)
    max_requests_jitter: int = Field(0, ge=0, le=10_000_000)
    worker_connections: int = Field(1000, ge=1, le=100_000)
    threads: int = Field(4, ge=1, le=256)
    read_timeout: int = Field(10, ge=1, le=3600)
    max_concurrent_predictions: int = Field(1, ge=1, le=256)
    max_request_body: int = Field(100 * 1024 * 1024, ge=0, le=1 << 40)
    info_details: bool = False
    with_error_server: bool = False
    backlog: int = Field(2048, ge=1, le=65535)
    failure_exit_delay: float = Field(3.0, ge=0, le=60)

    @field_validator("max_request_body", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("url_prefix")
    @classmethod
    def _normalize_prefix(cls, value: str) -> str:
        value = value.strip()
        inner = value.strip("/")
        if inner and not all(_PREFIX_SEGMENT.match(part) for part in inner.split("/")):
            raise ValueError("must be a path such as /api/v1: letters, digits, '.', '_', '~' and "
                             "'-' between single slashes")
        return f"/{inner}" if inner else ""

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port, e.g. 0.0.0.0:8080")
        return value

    @field_validator("mode", "worker_class", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     **overrides: object) -> ServerSettings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, name in _ENV_NAMES.items():
            raw = env.get(name, "").strip()
            if raw:
                values[field] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(
                f"{_ENV_NAMES.get(field, field)}: {msg} (got {values.get(field)!r})"
            ) from None
