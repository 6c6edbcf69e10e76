"""Logging for servers: plain or JSON lines (``LOG_FORMAT=json``), one configuration for gunicorn
and for servers that configure only their own loggers (plain uvicorn)."""

from __future__ import annotations

import logging
import logging.config
import os
import re
import sys
import uuid
from typing import Any

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


def request_id(incoming: str | None) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex
