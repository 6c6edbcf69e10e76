"""Gunicorn settings for the Flask app, from the environment (see the README's table).

Used by ``deploy/gunicorn.conf.py`` and ``drum-servers serve``; the FastAPI variant overrides
the worker class and app in ``gunicorn_uvicorn_conf``.
"""

from __future__ import annotations

from drum_servers.gunicorn_hooks import on_starting, post_fork
from drum_servers.settings import ServerSettings

_settings = ServerSettings.from_environ()

wsgi_app = "drum_servers.flask_app:create_app()"
bind = [_settings.address]
workers = _settings.workers
worker_class = _settings.worker_class.value
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
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "botocore": {"level": "WARNING"},
        "urllib3": {"level": "WARNING"},
        "filelock": {"level": "WARNING"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "generic",
                    "stream": "ext://sys.stdout"},
        "error_console": {"class": "logging.StreamHandler", "formatter": "generic",
                          "stream": "ext://sys.stderr"},
    },
    "formatters": {
        "generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"},
    },
}

__all__ = [
    "accesslog", "backlog", "bind", "control_socket_disable", "errorlog", "graceful_timeout",
    "keepalive", "logconfig_dict", "loglevel", "max_requests", "max_requests_jitter",
    "on_starting", "post_fork", "preload_app", "timeout", "worker_class", "worker_connections",
    "workers", "wsgi_app",
]
