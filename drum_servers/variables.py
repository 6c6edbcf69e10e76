"""The environment variables the servers read, by setting name: registered with the
misspelled-variable check on import, apart from ``settings`` so that ``drum-servers download``
(which reads none of them, but warns about near misses) does not build the servers' settings."""

from __future__ import annotations

from lazy_loading.environ import register_known

ENV_NAMES = {
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


register_known(ENV_NAMES.values())
