"""Gunicorn server hooks: prefetch once in the master, re-check cheaply in every worker.

* ``on_starting`` (master, before any fork): download everything. The engine creates its
  client, thread pool and event loop per call and closes them, so nothing leaks into workers.
  A failure logs one line and exits 1 before a single worker starts.
* ``post_fork`` (each worker): make sure the files are present. When the master's download is
  complete and every file is still intact (manifest ETag, size, mtime) that costs no request at
  all, and every worker, recycled ones included, serves the version the master verified;
  otherwise the worker runs the download itself (a HEAD per object, bodies only for what is
  missing). A failure *raises* (gunicorn then stops non-zero); ``sys.exit(1)`` here would
  respawn forever.

In background mode both hooks step aside: the app downloads while ``/ping/`` already answers,
and ``worker_exit`` cancels that download (removing its temp files) when the worker stops.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lazy_loading import LazyLoadingError

from .model import ModelHooks
from .readiness import current_state, start_server_instance, stop_background_download
from .settings import ReadinessMode
from .signals import stop_signals_exit

logger = logging.getLogger("drum_servers")


def on_starting(server: Any) -> None:
    start_server_instance()
    state = current_state()
    try:
        ModelHooks.check(state.code_dir)
        if state.mode is ReadinessMode.BACKGROUND or not state.handler.is_lazy_loading_available:
            return
        with stop_signals_exit():
            state.download()
    except LazyLoadingError as exc:
        if state.fail_or_serve_error(exc):
            return
        server.log.error("%s", exc)
        sys.exit(1)


def post_fork(server: Any, worker: Any) -> None:
    state = current_state()
    if state.mode is ReadinessMode.BACKGROUND or state.serving_error:
        return
    try:
        with stop_signals_exit():
            state.download()
    except LazyLoadingError as exc:
        if state.fail_or_serve_error(exc):
            return
        server.log.error("worker %s: %s", worker.pid, exc)
        raise


def worker_exit(server: Any, worker: Any) -> None:
    stop_background_download()
