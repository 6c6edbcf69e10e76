"""``drum-servers demo``: an S3-compatible server on loopback, a sample model in it, and a real
gunicorn server that lazy-loads the model from it. Everything stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lazy_loading import ConfigError

from .embedded_s3 import EmbeddedS3Server
from .extras import require, server_extras

DEMO_BUCKET = "demo-models"
DEMO_DIM = 1024 * 1024  # 8 MiB of float64 weights
DEMO_ACCESS_KEY = "demo-access-key"
DEMO_SECRET = "demo-secret-key"


def sample_model(dim: int = DEMO_DIM, seed: int = 0) -> dict[str, bytes]:
    """The sample artifacts: remote key -> bytes."""
    rng = random.Random(seed)
    weights = struct.pack(f"<{dim}d", *(rng.uniform(-1, 1) for _ in range(dim)))
    meta = json.dumps({"bias": 0.5, "dim": dim}).encode()
    return {"sample/model.json": meta, "sample/weights.bin": weights}


def upload_sample(url: str, bucket: str = DEMO_BUCKET, dim: int = DEMO_DIM) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=DEMO_ACCESS_KEY,
                          aws_secret_access_key=DEMO_SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    objects = sample_model(dim)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.close()
    return objects


def lazy_loading_environ(url: str, bucket: str = DEMO_BUCKET) -> dict[str, str]:
    """DRUM's environment contract pointing at the embedded store."""
    data = {
        "files": [
            {"remotePath": "sample/model.json", "localPath": "artifacts/model.json",
             "repositoryId": "demo"},
            {"remotePath": "sample/weights.bin", "localPath": "artifacts/weights.bin",
             "repositoryId": "demo"},
        ],
        "repositories": [{"repositoryId": "demo", "bucketName": bucket,
                          "credentialId": "demo-cred", "endpointUrl": url}],
    }
    secret = {"credentialType": "s3", "awsAccessKeyId": DEMO_ACCESS_KEY,
              "awsSecretAccessKey": DEMO_SECRET}
    return {"MLOPS_LAZY_LOADING_DATA": json.dumps(data),
            "MLOPS_REPOSITORY_SECRET_DEMO_CRED": json.dumps(secret)}


def prepare_code_dir(code_dir: Path) -> Path:
    code_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "demo_model" / "custom.py", code_dir / "custom.py")
    return code_dir


def _get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def check_port_free(address: str) -> None:
    """Fail before any download when another process holds the port gunicorn will bind."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {address}: {exc.strerror or exc}; pick another address with "
                "--address 127.0.0.1:8081 (or ADDRESS=127.0.0.1:8081)") from None


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived: stop gunicorn, remove what the demo created, exit 0."""


def _hold_stop_signals() -> None:
    """From here on a SIGINT or SIGTERM must not cut the cleanup short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        _hold_stop_signals()
        raise _Stopped

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_server(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_demo(address: str, server: str, workers: int, code_dir: Path | None) -> int:
    """Serve the sample model until gunicorn exits or the demo gets SIGINT or SIGTERM, which
    stop gunicorn too; a temp code dir the demo made is removed either way."""
    require("demo", *server_extras(server), purpose="drum-servers demo")
    check_port_free(address)
    host, _, port = address.rpartition(":")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    with _stop_on_signals():
        work = Path(tempfile.mkdtemp(prefix="drum-servers-demo-")) if code_dir is None else code_dir
        proc: subprocess.Popen[bytes] | None = None
        try:
            print("demo: starting an S3-compatible server on 127.0.0.1 (moto) …", file=sys.stderr)
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            with EmbeddedS3Server() as s3:
                upload_sample(s3.url)
                prepare_code_dir(work)
                env = {**os.environ, **lazy_loading_environ(s3.url), "CODE_DIR": str(work),
                       "ADDRESS": address, "MAX_WORKERS": str(workers)}
                conf = ("drum_servers.gunicorn_conf" if server == "flask"
                        else "drum_servers.gunicorn_uvicorn_conf")
                print(f"demo: serving {work} with gunicorn ({server}, {workers} workers) on "
                      f"{address}", file=sys.stderr)
                proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", f"python:{conf}"],
                                        env=env)
                if _wait_ready(proc, base):
                    print(
                        "\ndemo: ready. Try:\n"
                        f"  curl -s -X POST {base}/predictUnstructured/ "
                        "-H 'Content-Type: application/json' -d '{\"x\": [1, 2, 3]}'\n"
                        f"  curl -s {base}/info/\n"
                        "Press Ctrl-C to stop.\n",
                        file=sys.stderr,
                    )
                return proc.wait()
        except _Stopped:
            print("demo: stopping", file=sys.stderr)
            return 0
        finally:
            _hold_stop_signals()
            if proc is not None:
                _stop_server(proc)
            if code_dir is None:
                shutil.rmtree(work, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen[bytes], base: str) -> bool:
    while proc.poll() is None:
        try:
            status, _ = _get(f"{base}/health/")
        except OSError:
            status = 0
        if status == 200:
            return True
        time.sleep(0.2)
    return False
