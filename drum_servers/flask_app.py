"""Flask adapter: ``create_app()`` for ``gunicorn 'drum_servers.flask_app:create_app()'``, and
``init_app(app)`` to add the DRUM routes and lazy loading to an existing Flask app."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from flask import Blueprint, Flask, Response, request

from lazy_loading import LazyLoadingError

from . import views
from .contract import REQUEST_ID_HEADER, WRONG_ENDPOINT_ROUTES
from .logs import ensure_logging, response_headers
from .readiness import ReadinessState, current_state
from .settings import ReadinessMode

logger = logging.getLogger("drum_servers")


def _respond(view: views.View) -> Response:
    return Response(view.body, status=view.status, content_type=view.content_type,
                    headers=view.headers)


def init_app(app: Flask, code_dir: str | os.PathLike[str] | None = None, *,
             mode: ReadinessMode | str | None = None, url_prefix: str | None = None,
             ) -> ReadinessState:
    """Register the routes and make the model ready (now, or in the background)."""
    state = current_state(code_dir, mode)
    state.server_name = "flask"
    prefix = state.settings.url_prefix if url_prefix is None else url_prefix.rstrip("/")
    blueprint = Blueprint("drum_servers", __name__, url_prefix=prefix or None)

    def get_endpoint(path: str, view: views.ViewFunc) -> Callable[[], Response]:
        def get() -> Response:
            return _respond(views.handle(path, lambda: view(state)))

        return get

    for path, view in views.GET_ROUTES.items():
        blueprint.add_url_rule(path, f"get_{path.strip('/') or 'root'}", get_endpoint(path, view),
                               methods=["GET"], strict_slashes=False)

    def predict() -> Response:
        return _respond(views.handle("predict", _predict))

    def _predict() -> views.View:
        limit = state.settings.max_request_body
        announced = views.declared_length(request.headers.get("Content-Length"))
        if announced is not None and announced > limit:
            return views.body_too_large(limit)  # before a byte of it is read
        body = request.stream.read(limit + 1)
        if len(body) > limit:
            return views.body_too_large(limit)
        if announced is not None and len(body) < announced:
            return views.body_cut_short(len(body), announced)
        return views.predict(state, body, request.headers.get("Content-Type"), request.args,
                             dict(request.headers))

    for path in views.PREDICT_ROUTES:
        blueprint.add_url_rule(path, f"post_{path.strip('/')}", predict, methods=["POST"],
                               strict_slashes=False)

    def wrong_endpoint(path: str) -> Callable[[], Response]:
        def answer() -> Response:
            return _respond(views.handle(
                "wrong_endpoint", lambda: views.wrong_endpoint(state, path)))

        return answer

    for path in WRONG_ENDPOINT_ROUTES:
        blueprint.add_url_rule(path, f"wrong_{path.strip('/')}", wrong_endpoint(path),
                               methods=["POST"])
    app.register_blueprint(blueprint)

    @app.after_request
    def _tag(response: Response) -> Response:  # every response, Flask's own 404 and 405 too
        response.headers.update(response_headers(request.headers.get(REQUEST_ID_HEADER)))
        return response
    app.extensions["drum_servers"] = state

    if state.serving_error:
        pass
    elif state.mode is ReadinessMode.BACKGROUND:
        state.start_background_thread()
    else:
        try:
            state.prepare()
        except Exception as exc:
            if state.fail_or_serve_error(exc):
                return state
            if isinstance(exc, LazyLoadingError):
                logger.error("%s", exc)
            raise
    return state


def create_app(code_dir: str | os.PathLike[str] | None = None, *,
               mode: ReadinessMode | str | None = None, url_prefix: str | None = None) -> Flask:
    """An app factory: ``gunicorn 'drum_servers.flask_app:create_app()'``."""
    ensure_logging()
    app = Flask("drum_servers")
    init_app(app, code_dir, mode=mode, url_prefix=url_prefix)
    return app
