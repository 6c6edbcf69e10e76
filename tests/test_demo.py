"""`drum-servers demo` (what `make demo` runs): embedded S3, sample model, real gunicorn."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.servers import free_port


def test_demo_serves_predictions_from_the_lazy_loaded_model(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "drum_servers.cli", "demo", "--address", f"127.0.0.1:{port}",
             "--code-dir", str(tmp_path / "code")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
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
        assert (tmp_path / "code" / "artifacts" / "weights.bin").stat().st_size == 8 * 1024 * 1024
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(5)
    assert code == 0, log.read_text()
