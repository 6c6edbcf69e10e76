"""Logging for servers: plain or JSON lines (``LOG_FORMAT=json``), one configuration for gunicorn
and for servers that configure only their own loggers (plain uvicorn)."""

from __future__ import annotations

import contextvars
import logging
import logging.config
import os
import re
import sys
import uuid
from typing import Any

from .contract import (
    DRUM_COMPAT_VERSION,
    DRUM_REQUEST_ID_HEADER,
    DRUM_VERSION_HEADER,
    REQUEST_ID_HEADER,
)

_OURS = ("lazy_loading", "drum_servers")
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms request_id=%({x-request-id}o)s'

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def log_format() -> str:
    fmt = os.environ.get("LOG_FORMAT", "text").strip().lower()
    return "json" if fmt == "json" else "text"


def _formatter() -> dict[str, Any]:
    if log_format() == "json":
        return {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS,
                "rename_fields": {"levelname": "level", "name": "logger", "asctime": "time"}}
    return {"format": TEXT_FORMAT}


def logging_config() -> dict[str, Any]:
    """A ``dictConfig`` for the whole process (gunicorn's ``logconfig_dict``)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": _formatter()},
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "formatter": "default",
                       "stream": "ext://sys.stdout"},
            "stderr": {"class": "logging.StreamHandler", "formatter": "default",
                       "stream": "ext://sys.stderr"},
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
            "botocore": {"level": "WARNING"},
            "urllib3": {"level": "WARNING"},
            "filelock": {"level": "WARNING"},
        },
    }


def ensure_logging(level: int = logging.INFO) -> None:
    """Give our loggers a handler when nobody configured the root logger (plain uvicorn)."""
    if logging.getLogger().handlers:
        return
    formatter = logging.config.DictConfigurator({}).configure_formatter(_formatter())
    for name in _OURS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(formatter)
            logger.addHandler(handler)
            logger.setLevel(level)


current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "drum_servers_request_id", default=None)


def request_id(incoming: str | None) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return str(uuid.uuid4())


def response_headers(incoming_request_id: str | None) -> dict[str, str]:
    """Headers every response carries, whichever route or error produced it: the request id
    under the standard name and under DRUM's, and DRUM's version header."""
    rid = request_id(incoming_request_id)
    return {REQUEST_ID_HEADER: rid, DRUM_REQUEST_ID_HEADER: rid,
            DRUM_VERSION_HEADER: DRUM_COMPAT_VERSION}


class _RequestIdFilter(logging.Filter):
    """Gives uvicorn's access records the request id (JSON formatters emit it as a field)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_request_id.get()
        if rid is not None:
            record.request_id = rid
        return True


class _AppendRequestId(logging.Formatter):
    """Wraps a text formatter: uvicorn's access format has no field for the id, and its
    formatter insists on its own five arguments, so the id is appended to the formatted line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} request_id={rid}" if rid else text


def tag_uvicorn_access_log() -> None:
    """Call once uvicorn (or gunicorn's UvicornWorker) has set up its access handlers."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RequestIdFilter) for f in access.filters):
        access.addFilter(_RequestIdFilter())
    for handler in access.handlers:
        formatter = handler.formatter or logging.Formatter()
        if not isinstance(formatter, _AppendRequestId) and not type(
                formatter).__module__.startswith("pythonjsonlogger"):
            handler.setFormatter(_AppendRequestId(formatter))
