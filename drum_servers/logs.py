"""Make download and readiness logs visible under servers that configure only their own loggers
(plain uvicorn), without overriding a configuration the user or gunicorn already installed."""

from __future__ import annotations

import logging
import sys

_OURS = ("lazy_loading", "drum_servers")
FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def ensure_logging(level: int = logging.INFO) -> None:
    if logging.getLogger().handlers:
        return
    for name in _OURS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            logger.addHandler(handler)
            logger.setLevel(level)
