"""Gunicorn settings for the Flask app, from the environment (see the README's table).

Used by ``deploy/gunicorn.conf.py`` and ``drum-servers serve``; the FastAPI variant overrides
the worker class and app in ``gunicorn_uvicorn_conf``.
"""

# ruff: noqa: E402 - the gevent patch and the extras check must run before the other imports

from __future__ import annotations

import os
import sys

_FOR_FASTAPI = "drum_servers.gunicorn_uvicorn_conf" in sys.modules  # it imports this module

if not _FOR_FASTAPI and os.environ.get("DRUM_GUNICORN_WORKER_CLASS", "").strip().lower() == "gevent":
    # gevent must patch before ssl/socket are imported (boto3 imports them below), or clients
    # created in a worker fail with RecursionError in SSLContext; gunicorn's own patch_all()
    # in the worker comes too late for modules this config has already imported.
    try:
        from gevent import monkey

        monkey.patch_all()
    except ImportError:
        pass  # reported next, with the extra to install

from drum_servers.extras import exit_unless_installed

if not _FOR_FASTAPI:
    exit_unless_installed("gunicorn", "flask", purpose="the gunicorn Flask config")

import contextlib

from drum_servers.gunicorn_hooks import on_starting, post_fork, worker_exit
from drum_servers.logs import ACCESS_LOG_FORMAT, logging_config
from drum_servers.metrics import mark_process_dead
from drum_servers.settings import ServerSettings, WorkerClass
from lazy_loading import ConfigError

try:
    _settings = ServerSettings.from_environ()
except ConfigError as _exc:  # one line and exit 1, not gunicorn's config traceback
    print(f"error: {_exc}", file=sys.stderr)
    raise SystemExit(1) from None

# Import the app module once in the master so forked workers share it instead of each paying
# for the import (the app itself is still created per worker).
with contextlib.suppress(ImportError):
    import drum_servers.flask_app  # noqa: F401

wsgi_app = "drum_servers.flask_app:create_app()"
bind = [_settings.address]
workers = _settings.workers
worker_class = _settings.worker_class.gunicorn_name
# gunicorn turns a "sync" worker with threads > 1 into its own gthread worker
threads = _settings.threads if _settings.worker_class is WorkerClass.GTHREAD else 1
worker_connections = _settings.worker_connections
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout
keepalive = _settings.keepalive
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests_jitter
backlog = _settings.backlog
preload_app = False
# gunicorn >= 27 opens a control socket under $HOME; containers often have a read-only root and
# no home. Older versions ignore the setting.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
logconfig_dict = logging_config()
access_log_format = ACCESS_LOG_FORMAT


def child_exit(server: object, worker: object) -> None:
    mark_process_dead(worker.pid)  # type: ignore[attr-defined]


__all__ = [
    "access_log_format", "accesslog", "backlog", "bind", "child_exit", "control_socket_disable",
    "errorlog", "graceful_timeout", "keepalive", "logconfig_dict", "loglevel", "max_requests",
    "max_requests_jitter", "on_starting", "post_fork", "preload_app", "threads", "timeout",
    "worker_class", "worker_connections", "worker_exit", "workers", "wsgi_app",
]
