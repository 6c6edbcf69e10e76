"""The DRUM routes as framework-free functions; Flask and FastAPI only translate I/O."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lazy_loading.redact import one_line, redact

from . import metrics as _metrics
from .readiness import ReadinessState
from .unstructured import decode_body, encode_result, parse_content_type

logger = logging.getLogger("drum_servers")

RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class View:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> View:
    return View(status, json.dumps(payload).encode(), "application/json", headers or {})


def ping(state: ReadinessState) -> View:
    return _json(200, {"message": "OK"})


def health(state: ReadinessState) -> View:
    status, body = state.health()
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    return _json(status, body, headers)


def info(state: ReadinessState) -> View:
    return _json(200, state.info())


def body_too_large(limit: int) -> View:
    return _json(413, {"message": f"ERROR: the request body is larger than {limit} bytes "
                                  "(MAX_REQUEST_BODY_BYTES)"})


def body_cut_short(received: int, announced: int) -> View:
    """The client went away mid-body: the model must not score a truncated request."""
    logger.warning("request body cut short: %d of %d bytes", received, announced)
    return _json(400, {"message": f"ERROR: the request body ended after {received} of "
                                  f"{announced} bytes"})


def declared_length(header: str | None) -> int | None:
    return int(header) if header is not None and header.strip().isdigit() else None


def predict(state: ReadinessState, body: bytes, content_type: str | None,
            query: Mapping[str, str]) -> View:
    """Call ``score_unstructured``; 503 before ready, 500 with a short message on a hook error."""
    if not state.ready or state.hooks is None:
        return _json(503, {"message": f"model not ready: {state.phase.value}"},
                     {"Retry-After": str(RETRY_AFTER_SECONDS)})
    mimetype, charset = parse_content_type(content_type)
    try:
        data = decode_body(body, mimetype, charset)
    except (LookupError, UnicodeError, ValueError) as exc:  # the client's charset, not ours
        logger.warning("cannot decode a %s request body: %s", mimetype, one_line(str(exc)))
        return _json(500, {"message": f"ERROR: {one_line(str(exc), 200)}"})
    try:
        result = state.hooks.score_unstructured(
            state.model, data, mimetype=mimetype, charset=charset, query=dict(query)
        )
        response = encode_result(result)
    except Exception as exc:
        logger.exception("score_unstructured failed")
        message = redact(str(exc)).splitlines()[0][:200] if str(exc) else ""
        return _json(500, {"message": f"ERROR: {type(exc).__name__}: {message}".rstrip(": ")})
    return View(200, response.body, response.content_type)


def metrics(state: ReadinessState) -> View:
    rendered = _metrics.render()
    if rendered is None:
        return _json(404, {"message": "metrics are off: install the 'metrics' extra"})
    body, content_type = rendered
    return View(200, body, content_type)


def handle(route: str, call: Callable[[], View]) -> View:
    """Run one view: time it and count it (the adapters tag every response, 404s included)."""
    started = time.perf_counter()
    view = call()
    label = route if route in _ROUTE_LABELS else "other"  # labels stay bounded, whatever the URL
    _metrics.record_request(label, view.status, time.perf_counter() - started)
    return view


ViewFunc = Callable[[ReadinessState], View]

GET_ROUTES: dict[str, ViewFunc] = {"/": ping, "/ping/": ping, "/health/": health, "/info/": info,
                                   "/metrics": metrics}
PREDICT_ROUTES = ("/predictUnstructured/", "/predictionsUnstructured/")
_ROUTE_LABELS = frozenset([*GET_ROUTES, "predict"])
