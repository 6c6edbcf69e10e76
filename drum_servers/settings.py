"""Server settings read from the environment (DRUM's names where DRUM has one)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from lazy_loading.schema import (
    Check,
    Field,
    boolean,
    chain,
    check_settings,
    integer,
    number,
    path,
    text,
)
from lazy_loading.settings import byte_size

from .variables import ENV_NAMES as _ENV_NAMES


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


E = TypeVar("E", bound=Enum)

_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")


@dataclass(frozen=True)
class ServerSettings:
    """Every server knob; the README's configuration table documents each env var."""

    code_dir: Path = field(default_factory=Path.cwd)
    mode: ReadinessMode = ReadinessMode.BLOCKING
    url_prefix: str = ""
    address: str = "0.0.0.0:8080"
    workers: int = 1
    worker_class: WorkerClass = WorkerClass.GTHREAD
    timeout: int = 120
    graceful_timeout: int = 30
    keepalive: int = 5
    max_requests: int = 0
    max_requests_jitter: int = 0
    worker_connections: int = 1000
    threads: int = 4
    read_timeout: int = 10
    max_concurrent_predictions: int = 1
    max_request_body: int = 100 * 1024 * 1024
    info_details: bool = False
    with_error_server: bool = False
    backlog: int = 2048
    failure_exit_delay: float = 3.0

    def __post_init__(self) -> None:
        check_settings(self, _FIELDS, lambda name: _ENV_NAMES.get(name, name))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     **overrides: object) -> ServerSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in _ENV_NAMES.items():
            raw = env.get(variable, "").strip()
            if raw:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _url_prefix(value: str) -> str:
    value = value.strip()
    inner = value.strip("/")
    if inner and not all(_PREFIX_SEGMENT.match(part) for part in inner.split("/")):
        raise ValueError("must be a path such as /api/v1: letters, digits, '.', '_', '~' and "
                         "'-' between single slashes")
    return f"/{inner}" if inner else ""


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. 0.0.0.0:8080")
    return value


def _choice(kind: type[E]) -> Check:
    allowed = " or ".join(repr(member.value) for member in kind)

    def check(value: object) -> E:
        if isinstance(value, kind):
            return value
        if isinstance(value, str):
            for member in kind:
                if member.value == value.strip().lower():
                    return member
        raise ValueError(f"must be {allowed}")
    return check


_FIELDS = (
    Field("code_dir", path),
    Field("mode", _choice(ReadinessMode)),
    Field("url_prefix", chain(text(), _url_prefix)),
    Field("address", chain(text(), _address)),
    Field("workers", integer(ge=1, le=64)),
    Field("worker_class", _choice(WorkerClass)),
    Field("timeout", integer(ge=1, le=3600)),
    Field("graceful_timeout", integer(ge=1, le=3600)),
    Field("keepalive", integer(ge=0, le=3600)),
    Field("max_requests", integer(ge=0, le=10_000_000)),
    Field("max_requests_jitter", integer(ge=0, le=10_000_000)),
    Field("worker_connections", integer(ge=1, le=100_000)),
    Field("threads", integer(ge=1, le=256)),
    Field("read_timeout", integer(ge=1, le=3600)),
    Field("max_concurrent_predictions", integer(ge=1, le=256)),
    Field("max_request_body", byte_size(ge=0, le=1 << 40, example="100MiB or 104857600")),
    Field("info_details", boolean),
    Field("with_error_server", boolean),
    Field("backlog", integer(ge=1, le=65535)),
    Field("failure_exit_delay", number(ge=0, le=60)),
)
