"""SIGTERM during a download: the process exits within seconds, non-zero, and leaves no temp files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drum_servers.demo import prepare_code_dir
from tests.conftest import S3Store, lazy_env, no_debris, payload
from tests.faults import Rule
from tests.procs import stop_group
from tests.servers import ROOT, free_port

MiB = 1024 * 1024


def _argv(kind: str, code_dir: Path) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    port = free_port()
    if kind == "cli":
        return [py, "-m", "drum_servers.cli", "download", "--code-dir", str(code_dir)], {}
    if kind == "post-fork-hook":
        # The worker hook as gunicorn calls it, in a process of its own (the master's prefetch
        # would otherwise leave the worker nothing to download).
        script = ("import logging, types\n"
                  "from drum_servers.gunicorn_hooks import post_fork\n"
                  "server = types.SimpleNamespace(log=logging.getLogger('gunicorn.error'))\n"
                  "post_fork(server, types.SimpleNamespace(pid=0))\n")
        return [py, "-c", script], {}
    if kind == "gunicorn-master":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            "ADDRESS": f"127.0.0.1:{port}"}
    if kind.startswith("gunicorn-background-"):  # the workers download, the master stops them
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            "ADDRESS": f"127.0.0.1:{port}", "LAZY_LOADING_MODE": "background",
            "DRUM_GUNICORN_WORKER_CLASS": kind.removeprefix("gunicorn-background-")}
    if kind == "uvicorn-background":
        return [py, "-m", "uvicorn", "--factory", "drum_servers.fastapi_app:create_app",
                "--host", "127.0.0.1", "--port", str(port)], {"LAZY_LOADING_MODE": "background"}
    return [py, "-m", "uvicorn", "--factory", "drum_servers.fastapi_app:create_app",
            "--host", "127.0.0.1", "--port", str(port)], {}


def _default_dispositions() -> None:
    """The child starts with default signal handling, whatever this process inherited."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


CASES = [*((kind, signal.SIGTERM) for kind in
           ("cli", "gunicorn-master", "post-fork-hook", "uvicorn-lifespan")),
         *((kind, sig) for kind in ("cli", "gunicorn-master")
           for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)),
         ("uvicorn-lifespan", signal.SIGINT),
         *((kind, signal.SIGTERM) for kind in ("gunicorn-background-gthread",
                                               "gunicorn-background-sync",
                                               "gunicorn-background-gevent",
                                               "uvicorn-background"))]
# A server in background mode is up when the signal comes: SIGTERM is its ordinary stop, and
# gunicorn's master then exits 0 whatever its workers were doing.
STOPS_WITH_ZERO = {"gunicorn-background-gthread", "gunicorn-background-sync",
                   "gunicorn-background-gevent", "uvicorn-background"}


@pytest.mark.parametrize(("kind", "stop_with"), CASES,
                         ids=[f"{kind}-{sig.name}" for kind, sig in CASES])
def test_a_stop_signal_mid_download_exits_promptly_and_cleans_up(
    kind: str, stop_with: signal.Signals, s3: S3Store, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "big.bin", payload(8 * MiB, seed=3))
    code_dir = prepare_code_dir(tmp_path / "code")
    env = lazy_env(s3.url, bucket, {"big.bin": "artifacts/big.bin"},
                   LAZY_LOADING_PART_SIZE="1MiB", LAZY_LOADING_MAX_CONNECTIONS="2",
                   CODE_DIR=str(code_dir), PYTHONUNBUFFERED="1")
    s3.faults.add(Rule("throttle", key="big.bin", times=None, rate=512 * 1024))
    argv, extra = _argv(kind, code_dir)
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True, preexec_fn=_default_dispositions)
    try:
        deadline = time.monotonic() + 30
        while not no_debris(code_dir):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(stop_with)
        code = proc.wait(15)
        elapsed = time.monotonic() - sent
    finally:
        stop_group(proc)
    if kind not in STOPS_WITH_ZERO:
        assert code != 0, log.read_text()
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert no_debris(code_dir) == [], "temp files removed"
    assert not (code_dir / "artifacts" / "big.bin").exists()
    assert list((code_dir / ".lazy_loading" / "journal").glob("*")) == []
