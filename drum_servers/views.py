"""The DRUM routes as framework-free functions; Flask and FastAPI only translate I/O."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lazy_loading.redact import one_line, redact

from . import metrics as _metrics
from .contract import CAPABILITIES, USER_HTTP_ERROR_HEADER, WRONG_ENDPOINT_ROUTES
from .readiness import ReadinessState
from .stats import process_stats
from .unstructured import decode_body, encode_result, parse_content_type

logger = logging.getLogger("drum_servers")

RETRY_AFTER_SECONDS = 5
MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class View:
    status: int
    body: bytes
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> View:
    """JSON as DRUM's Flask sends it: compact, sorted keys, a final newline."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True) + "\n"
    return View(status, body.encode(), "application/json", headers or {})


def _error_server(state: ReadinessState) -> View | None:
    """DRUM's ``--with-error-server`` answer on its routes after a failed start."""
    error = state.serving_error
    return None if error is None else _json(513, {"message": f"ERROR: {error}"})


def ping(state: ReadinessState) -> View:
    return _error_server(state) or _json(200, {"message": "OK"})


def health(state: ReadinessState) -> View:
    if (error := _error_server(state)) is not None:
        return error
    status, body = state.health()
    if status == 200:
        body = {"message": "OK", **body}
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    return _json(status, body, headers)


def info(state: ReadinessState) -> View:
    return _json(200, state.info())


def capabilities(state: ReadinessState) -> View:
    return _json(200, CAPABILITIES)


def stats(state: ReadinessState) -> View:
    return _json(200, process_stats(state.prediction_times))


def wrong_endpoint(state: ReadinessState, path: str) -> View:
    """DRUM's answer to the structured-model routes on an unstructured model."""
    return _error_server(state) or _json(422, {"message": WRONG_ENDPOINT_ROUTES[path]})


def error_message(exc: BaseException) -> str:
    """DRUM's ``ERROR: <str(exc)>`` for a one-line message without a secret; otherwise (a
    traceback pasted into a message, a secret) the first line, redacted and bounded."""
    text = str(exc)
    if "\n" not in text and "\r" not in text and len(text) <= MAX_ERROR_CHARS \
            and redact(text) == text:
        return f"ERROR: {text}"
    first = one_line(redact(text).splitlines()[0] if text.strip() else "", 200)
    return f"ERROR: {type(exc).__name__}: {first}".rstrip(": ")


def _user_http_error(exc: Exception) -> View | None:
    """DRUM's ``CustomHTTPError`` (and any ``BaseCustomUserError``), recognised by its class
    when the model imported it: its status, its message, DRUM's marker header."""
    module = sys.modules.get("datarobot_drum.drum.exceptions")
    base = getattr(module, "BaseCustomUserError", None)
    if not isinstance(base, type) or not isinstance(exc, base):
        return None
    status = getattr(exc, "status_code", 400)
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 500
    return _json(status, {"message": one_line(redact(str(exc)), MAX_ERROR_CHARS)},
                 {USER_HTTP_ERROR_HEADER: "true"})


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
            query: Mapping[str, str], headers: Mapping[str, str]) -> View:
    """Call ``score_unstructured`` as DRUM does; 503 before ready."""
    if (error := _error_server(state)) is not None:
        return error
    if not state.ready or state.hooks is None:
        return _json(503, {"message": f"model not ready: {state.phase.value}"},
                     {"Retry-After": str(RETRY_AFTER_SECONDS)})
    try:
        data, mimetype, charset = decode_body(body, *parse_content_type(content_type))
    except (LookupError, UnicodeError) as exc:  # the client's charset: no traceback to log
        logger.warning("cannot decode a request body: %s", one_line(str(exc)))
        return _json(500, {"message": error_message(exc)})
    started = time.perf_counter()
    try:
        kwargs: dict[str, Any] = {"mimetype": mimetype, "query": query, "headers": dict(headers)}
        if charset is not None:
            kwargs["charset"] = charset
        result = state.hooks.score_unstructured(state.model, data, **kwargs)
        response = encode_result(result)
    except Exception as exc:
        user_error = _user_http_error(exc)
        if user_error is not None:
            logger.warning("score_unstructured answered %d: %s", user_error.status,
                           one_line(redact(str(exc))))
            return user_error
        logger.exception("score_unstructured failed")
        return _json(500, {"message": error_message(exc)})
    finally:
        state.prediction_times.add(time.perf_counter() - started)
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
                                   "/capabilities/": capabilities, "/stats/": stats,
                                   "/metrics": metrics}
PREDICT_ROUTES = ("/predictUnstructured/", "/predictionsUnstructured/")
_ROUTE_LABELS = frozenset([*GET_ROUTES, "predict", "wrong_endpoint"])
