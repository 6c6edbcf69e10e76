"""`drum-servers demo` (what `make demo` runs): embedded S3, sample model, real gunicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import live_descendants, stop_group
from tests.servers import free_port


def _demo(tmp_path: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "drum_servers.cli", "demo", "--address", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    return proc, log


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_serves_predictions_then_stops_everything_on_a_signal(
    stop_with: signal.Signals, tmp_path: Path
) -> None:
    port = free_port()
    proc, log = _demo(tmp_path, port)
    try:
        deadline = time.monotonic() + 90
        while "demo: ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert f"curl -s -X POST http://127.0.0.1:{port}/predictUnstructured/" in text
        resp = httpx.post(f"http://127.0.0.1:{port}/predictUnstructured/", json={"x": [1, 2, 3]},
                          timeout=10)
        assert resp.status_code == 200
        assert set(resp.json()) == {"prediction", "weights_sha256", "pid"}
        (work,) = tmp_path.glob("drum-servers-demo-*")
        assert (work / "artifacts" / "weights.bin").stat().st_size == 8 * 1024 * 1024

        proc.send_signal(stop_with)  # the demo alone, as `kill` or a process manager does
        code = proc.wait(40)
    finally:
        stop_group(proc)
    assert code == 0, log.read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert [cmd for cmd in live_descendants().values() if "gunicorn" in cmd] == []
    assert list(tmp_path.glob("drum-servers-demo-*")) == [], "the demo's temp dir is removed"


def test_demo_on_a_busy_port_says_so_before_any_download(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, log = _demo(tmp_path, port)
        try:
            code = proc.wait(60)
        finally:
            stop_group(proc)
    lines = log.read_text().strip().splitlines()
    assert code == 1
    assert lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick "
                     "another address with --address 127.0.0.1:8081 (or ADDRESS=127.0.0.1:8081)"]
    assert list(tmp_path.glob("drum-servers-demo-*")) == []


def test_the_suite_fails_when_a_test_leaves_a_process_behind(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(
        "import subprocess, sys\n"
        "def test_leaks():\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                     start_new_session=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.leakcheck", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "processes left running by the tests (now killed)" in result.stdout
    assert "1 passed, 1 error" in result.stdout
