"""Gunicorn server hooks: prefetch once in the master, re-check cheaply in every worker.

* ``on_starting`` (master, before any fork): download everything. The engine creates its
  client, thread pool and event loop per call and closes them, so nothing leaks into workers.
  A failure logs one line and exits 1 before a single worker starts.
* ``post_fork`` (each worker): make sure the files are present — a manifest check and a HEAD per
  object, no body — so a worker recycled by ``max_requests`` or a crash never re-downloads. A
  failure *raises* (gunicorn then stops non-zero); ``sys.exit(1)`` here would respawn forever.

In background mode both hooks step aside: the app downloads while ``/ping/`` already answers.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lazy_loading import LazyLoadingError

from .readiness import current_state
from .settings import ReadinessMode
from .signals import sigterm_exits

logger = logging.getLogger("drum_servers")


def on_starting(server: Any) -> None:
    state = current_state()
    state.clear_ready_markers()
    if state.mode is ReadinessMode.BACKGROUND or not state.handler.is_lazy_loading_available:
        return
    try:
        with sigterm_exits():
            state.download()
    except LazyLoadingError as exc:
        server.log.error("%s", exc)
        sys.exit(1)


def post_fork(server: Any, worker: Any) -> None:
    state = current_state()
    if state.mode is ReadinessMode.BACKGROUND:
        return
    try:
        with sigterm_exits():
            state.download()
    except LazyLoadingError as exc:
        server.log.error("worker %s: %s", worker.pid, exc)
        raise
