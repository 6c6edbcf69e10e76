"""`make smoke`: every server variant from a regular install without the test extras.

Run with the smoke venv's Python from outside the checkout, so that ``drum_servers`` is the
installed wheel, not the source tree. Uses only the standard library and what ``.[all]``
installs: a dependency the extras forget fails here, as it would for a user.

    python tests/smoke.py DEPLOY_DIR
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import drum_servers
from drum_servers.demo import lazy_loading_environ, prepare_code_dir, upload_sample
from drum_servers.embedded_s3 import EmbeddedS3Server

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _variants(deploy: Path, port: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    def gunicorn(config: str) -> list[str]:
        return [str(BIN / "gunicorn"), "-c", config]

    address = {"ADDRESS": f"127.0.0.1:{port}", "MAX_WORKERS": "2"}
    flask_conf, fastapi_conf = str(deploy / "gunicorn.conf.py"), str(deploy / "gunicorn_uvicorn.conf.py")
    return {
        "gunicorn flask gthread, the default (deploy/)": (gunicorn(flask_conf), address),
        "gunicorn flask sync (deploy/)": (gunicorn(flask_conf),
                                          {**address, "DRUM_GUNICORN_WORKER_CLASS": "sync"}),
        "gunicorn flask gevent (deploy/)": (gunicorn(flask_conf),
                                            {**address, "DRUM_GUNICORN_WORKER_CLASS": "gevent"}),
        "gunicorn fastapi (deploy/)": (gunicorn(fastapi_conf), address),
        "gunicorn flask (python:drum_servers.gunicorn_conf)": (
            gunicorn("python:drum_servers.gunicorn_conf"), address),
        "uvicorn fastapi": ([str(BIN / "uvicorn"), "--factory", "drum_servers.fastapi_app:create_app",
                             "--host", "127.0.0.1", "--port", str(port)], {}),
        "drum-servers serve --server fastapi": (
            [str(BIN / "drum-servers"), "serve", "--server", "fastapi", "--workers", "2",
             "--address", f"127.0.0.1:{port}"], {}),
        "drum-servers demo": ([str(BIN / "drum-servers"), "demo", "--address",
                               f"127.0.0.1:{port}"], {}),
    }


def _request(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _check(name: str, argv: list[str], env: dict[str, str], port: int, log: Path) -> str | None:
    """None when the variant becomes healthy and predicts, else what went wrong."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                return f"exited {proc.returncode} before it was healthy"
            if time.monotonic() > deadline:
                return "not healthy after 90 s"
            try:
                if _request(base + "/health/")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        status, body = _request(base + "/predictUnstructured/", b'{"x": [1, 2, 3]}')
        if status != 200 or "prediction" not in json.loads(body):
            return f"prediction answered {status}: {body[:200]!r}"
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(deploy: Path) -> int:
    print(f"smoke: drum_servers from {Path(drum_servers.__file__).parent}")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="drum-smoke-") as tmp, EmbeddedS3Server() as s3:
        upload_sample(s3.url)
        env_base = {**os.environ, **lazy_loading_environ(s3.url)}
        names = list(_variants(deploy, 0))
        for i, name in enumerate(names):
            port = _free_port()
            argv, extra = _variants(deploy, port)[name]
            work = Path(tmp) / f"variant-{i}"
            code_dir = prepare_code_dir(work / "code")
            env = {**env_base, **extra, "CODE_DIR": str(code_dir), "HOME": str(work),
                   "TMPDIR": str(work)}
            started = time.monotonic()
            problem = _check(name, argv, env, port, work / "server.log")
            took = time.monotonic() - started
            if problem is None:
                print(f"smoke: ok    {name} ({took:.1f} s)")
            else:
                failures += 1
                print(f"smoke: FAIL  {name}: {problem}\n--- log ---\n"
                      f"{(work / 'server.log').read_text(errors='replace')[-3000:]}")
        problem = _check_missing_extra(deploy, Path(tmp))
        print(f"smoke: {'ok  ' if problem is None else 'FAIL'}  a missing extra is one line"
              f"{'' if problem is None else ': ' + problem}")
        failures += problem is not None
    print(f"{len(names) + 1 - failures} passed, {failures} failed")
    return 1 if failures else 0


def _check_missing_extra(deploy: Path, tmp: Path) -> str | None:
    """Last, as it uninstalls Flask from the smoke venv: the config names the extra to install."""
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", "flask"],
                   check=True, capture_output=True)
    result = subprocess.run([str(BIN / "gunicorn"), "-c", str(deploy / "gunicorn.conf.py")],
                            capture_output=True, text=True, timeout=60, cwd=tmp,
                            env={**os.environ, "CODE_DIR": str(tmp)})
    expected = ("error: the gunicorn Flask config needs the flask extra (missing: flask): "
                "pip install 'drum-lazy-loading[flask]'")
    if result.returncode != 1 or result.stderr.strip() != expected:
        return f"exit {result.returncode}: {result.stderr[-500:]}"
    return None


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
