"""Start real server processes (gunicorn, uvicorn, drum-servers) on loopback for tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.procs import stop_group

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_argv(kind: str, port: int, code_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The exact commands the README gives, per server kind."""
    py = sys.executable
    address = {"ADDRESS": f"127.0.0.1:{port}"}
    if kind == "gunicorn-flask-sync":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            **address, "MAX_WORKERS": "3"}
    if kind == "gunicorn-flask-gevent":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            **address, "MAX_WORKERS": "2", "DRUM_GUNICORN_WORKER_CLASS": "gevent"}
    if kind == "gunicorn-fastapi":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn_uvicorn.conf.py")], {
            **address, "MAX_WORKERS": "3"}
    if kind == "uvicorn-fastapi":
        return [py, "-m", "uvicorn", "--factory", "drum_servers.fastapi_app:create_app",
                "--host", "127.0.0.1", "--port", str(port)], {}
    if kind == "drum-servers-serve":
        return [py, "-m", "drum_servers.cli", "serve", "--code-dir", str(code_dir),
                "--workers", "2", "--address", f"127.0.0.1:{port}"], {}
    raise ValueError(kind)


WORKERS = {"gunicorn-flask-sync": 3, "gunicorn-flask-gevent": 2, "gunicorn-fastapi": 3,
           "uvicorn-fastapi": 1, "drum-servers-serve": 2}


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.base + path, timeout=timeout)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.base + path, timeout=10.0, **kwargs)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/health/", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_group(self.proc)


def start_server(kind: str, code_dir: Path, env: dict[str, str], log_path: Path) -> RunningServer:
    port = free_port()
    argv, extra = server_argv(kind, port, code_dir)
    full_env = {**env, **extra, "CODE_DIR": str(code_dir), "PYTHONUNBUFFERED": "1"}
    full_env.setdefault("HOME", str(code_dir.parent))
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    log.close()
    return RunningServer(proc, port, log_path)


class KeepAliveStore:
    """A read-only S3-like store that keeps connections open, as S3 does (HEAD, ranged GET).

    Records ``(method, client port)`` per request, so a test can count TCP connections.
    """

    def __init__(self, objects: dict[str, bytes], trickle_head: float = 0.0) -> None:
        import contextlib
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        store = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _object(self) -> bytes | None:
                store.requests.append((self.command, self.client_address[1]))
                key = self.path.lstrip("/").split("/", 1)[-1]
                body = objects.get(key)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return body

            def _headers(self, status: int, body: bytes, length: int) -> None:
                self.send_response(status)
                self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                self.send_header("Content-Length", str(length))
                self.send_header("Last-Modified", "Fri, 27 Nov 2026 00:00:00 GMT")

            def do_HEAD(self) -> None:
                body = self._object()
                if body is not None and trickle_head:
                    # Headers one byte at a time: every byte resets a socket timeout.
                    raw = (f"HTTP/1.1 200 OK\r\nETag: \"{hashlib.md5(body).hexdigest()}\"\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode()
                    with contextlib.suppress(OSError):
                        for i in range(len(raw)):
                            if store.stopping.is_set():
                                return
                            self.wfile.write(raw[i:i + 1])
                            self.wfile.flush()
                            time.sleep(trickle_head)
                    return
                if body is not None:
                    self._headers(200, body, len(body))
                    self.end_headers()

            def do_GET(self) -> None:
                body = self._object()
                if body is None:
                    return
                start, end = 0, len(body) - 1
                if rng := self.headers.get("Range"):
                    first, last = rng.removeprefix("bytes=").split("-")
                    start, end = int(first), int(last)
                self._headers(206 if rng else 200, body, end - start + 1)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                self.wfile.write(body[start:end + 1])

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> KeepAliveStore:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
