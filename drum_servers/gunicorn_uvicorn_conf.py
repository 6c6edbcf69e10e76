"""Gunicorn settings for the FastAPI app under ``uvicorn_worker.UvicornWorker``.

Multi-worker FastAPI runs here rather than ``uvicorn --workers N``, which exits 0 when a child
fails to start; gunicorn stops non-zero instead.
"""

from __future__ import annotations

from drum_servers.extras import exit_unless_installed

exit_unless_installed("gunicorn", "fastapi", purpose="the gunicorn FastAPI config")

import drum_servers.fastapi_app  # noqa: E402, F401  (imported once in the master, shared by forks)
from drum_servers.gunicorn_conf import *  # noqa: E402, F403
from drum_servers.gunicorn_conf import __all__ as _base  # noqa: E402

wsgi_app = "drum_servers.fastapi_app:create_app()"
worker_class = "uvicorn_worker.UvicornWorker"

__all__ = list(_base)
