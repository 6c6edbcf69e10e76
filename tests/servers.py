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
    if kind == "gunicorn-flask":  # the default worker class
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            **address, "MAX_WORKERS": "3"}
    if kind == "gunicorn-flask-sync":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            **address, "MAX_WORKERS": "3", "DRUM_GUNICORN_WORKER_CLASS": "sync"}
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


WORKERS = {"gunicorn-flask": 3, "gunicorn-flask-sync": 3, "gunicorn-flask-gevent": 2,
           "gunicorn-fastapi": 3, "uvicorn-fastapi": 1, "drum-servers-serve": 2}


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
    full_env = {**extra, **env, "CODE_DIR": str(code_dir), "PYTHONUNBUFFERED": "1"}
    full_env.setdefault("HOME", str(code_dir.parent))
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    log.close()
    return RunningServer(proc, port, log_path)
