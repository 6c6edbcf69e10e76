"""An S3-compatible server on loopback (moto's server app in a thread) for the demo and tests.

It speaks real HTTP, so the engine under test or demo is exactly the one users run against S3.
An optional WSGI ``middleware`` wraps moto's app, which is how tests inject faults.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


class EmbeddedS3Server:
    """``with EmbeddedS3Server() as s3: s3.url`` — an S3 endpoint at ``http://127.0.0.1:<port>``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 middleware: Callable[[WSGIApp], WSGIApp] | None = None) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app: WSGIApp = DomainDispatcherApplication(create_backend_app)
        if middleware is not None:
            app = middleware(app)
        self._server = make_server(host, port, app, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-s3",
                                        daemon=True)
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmbeddedS3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> EmbeddedS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
