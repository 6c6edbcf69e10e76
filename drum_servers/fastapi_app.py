"""FastAPI adapter: a lifespan that awaits the async download (never the sync bridge, which would
freeze the loop) and loads the model off the loop; ``create_app()`` for ``uvicorn --factory``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from werkzeug.datastructures import ImmutableMultiDict

from lazy_loading import LazyLoadingError

from . import views
from .contract import REQUEST_ID_HEADER, WRONG_ENDPOINT_ROUTES
from .logs import (
    current_request_id,
    ensure_logging,
    response_headers,
    tag_uvicorn_access_log,
)
from .readiness import ReadinessState, current_state
from .settings import ReadinessMode
from .signals import stop_signals_cancel

logger = logging.getLogger("drum_servers")

Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[Any]]


def _respond(view: views.View) -> Response:
    headers = dict(view.headers)
    if view.content_type is not None:
        headers["content-type"] = view.content_type
    return Response(content=view.body, status_code=view.status, headers=headers)


class RequestIdMiddleware:
    """Tags every response, the framework's own 404 and 405 included, and gives uvicorn's access
    line the same id (a pure ASGI middleware: it never buffers a body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = response_headers(Headers(scope=scope).get(REQUEST_ID_HEADER))
        token = current_request_id.set(extra[REQUEST_ID_HEADER])

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_tagged)
        finally:
            current_request_id.reset(token)


async def _read_body(request: Request, limit: int) -> bytes | views.View:
    """The body, held once: ``Request.body()`` would keep its chunks and their join together,
    and a ``BytesIO`` hands its own buffer to ``getvalue()``."""
    announced = views.declared_length(request.headers.get("content-length"))
    if announced is not None and announced > limit:
        return views.body_too_large(limit)  # before a byte of it is read
    buffer = io.BytesIO()
    async for chunk in request.stream():
        buffer.write(chunk)
        if buffer.tell() > limit:
            return views.body_too_large(limit)
    return buffer.getvalue()


def make_router(state_getter: Callable[[], ReadinessState], prefix: str = "") -> APIRouter:
    router = APIRouter(prefix=prefix)

    def get_endpoint(path: str, view: views.ViewFunc) -> Callable[[Request], Awaitable[Response]]:
        # A closure, not default arguments: FastAPI would expose those as query parameters.
        async def get(request: Request) -> Response:
            return _respond(views.handle(path, lambda: view(state_getter())))

        return get

    def options_endpoint(allow: str) -> Callable[[], Awaitable[Response]]:
        async def options() -> Response:  # what Flask answers for every route
            return Response(status_code=200, headers={"Allow": allow})

        return options

    for path, view in views.GET_ROUTES.items():
        endpoint = get_endpoint(path, view)
        for variant in {path, path.rstrip("/") or "/"}:
            router.add_api_route(variant, endpoint, methods=["GET", "HEAD"],
                                 include_in_schema=variant == path)
            router.add_api_route(variant, options_endpoint("GET, HEAD, OPTIONS"),
                                 methods=["OPTIONS"], include_in_schema=False)

    def wrong_endpoint(path: str) -> Callable[[], Awaitable[Response]]:
        async def answer() -> Response:
            return _respond(views.handle(
                "wrong_endpoint", lambda: views.wrong_endpoint(state_getter(), path)))

        return answer

    for path in WRONG_ENDPOINT_ROUTES:
        router.add_api_route(path, wrong_endpoint(path), methods=["POST"],
                             include_in_schema=False)

    async def predict(request: Request) -> Response:
        import anyio.to_thread

        state = state_getter()
        body = await _read_body(request, state.settings.max_request_body)
        if isinstance(body, views.View):
            return _respond(body)

        def call() -> views.View:
            return views.predict(state, body, request.headers.get("content-type"),
                                 ImmutableMultiDict(request.query_params.multi_items()),
                                 _drum_headers(request))

        view = await anyio.to_thread.run_sync(views.handle, "predict", call)
        return _respond(view)

    for path in views.PREDICT_ROUTES:
        for variant in (path, path.rstrip("/")):
            router.add_api_route(variant, predict, methods=["POST"],
                                 include_in_schema=variant == path)
            router.add_api_route(variant, options_endpoint("OPTIONS, POST"),
                                 methods=["OPTIONS"], include_in_schema=False)
    return router


def _drum_headers(request: Request) -> dict[str, str]:
    """``dict(request.headers)`` as DRUM's Flask builds it: ``Content-Type``-style names,
    repeated headers joined with commas."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        if name in ("content-type", "content-length") and not value:
            continue  # werkzeug leaves out these two when empty
        key = name.title()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


async def _prepare_or_exit(state: ReadinessState) -> None:
    try:
        await state.prepare_async()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        state.fail_and_exit(exc)


def make_lifespan(code_dir: str | os.PathLike[str] | None = None, *,
                  mode: ReadinessMode | str | None = None,
                  inner: Lifespan | None = None) -> Lifespan:
    """A lifespan that makes the model ready, composed around the user's own ``inner`` one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        state = current_state(code_dir, mode)
        state.server_name = "fastapi"
        app.state.drum_servers = state
        task: asyncio.Task[None] | None = None
        if state.serving_error:
            pass
        elif state.mode is ReadinessMode.BACKGROUND:
            task = asyncio.create_task(_prepare_or_exit(state))
        else:
            try:
                await stop_signals_cancel(state.prepare_async())
            except Exception as exc:
                if not state.fail_or_serve_error(exc):
                    if isinstance(exc, LazyLoadingError):
                        logger.error("%s", exc)
                    raise
        try:
            if inner is None:
                yield None
            else:
                async with inner(app) as value:
                    yield value
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    return lifespan


lifespan = make_lifespan()


def create_app(code_dir: str | os.PathLike[str] | None = None, *,
               mode: ReadinessMode | str | None = None, url_prefix: str | None = None) -> FastAPI:
    """``uvicorn --factory drum_servers.fastapi_app:create_app``."""
    ensure_logging()
    app = FastAPI(title="drum-servers", lifespan=make_lifespan(code_dir, mode=mode))

    def state() -> ReadinessState:
        return current_state(code_dir, mode)

    prefix = state().settings.url_prefix if url_prefix is None else url_prefix.rstrip("/")
    app.include_router(make_router(state, prefix))
    app.add_middleware(RequestIdMiddleware)
    tag_uvicorn_access_log()
    return app
