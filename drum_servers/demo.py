"""``drum-servers demo``: an S3-compatible server on loopback, a sample model in it, and a real
gunicorn server that lazy-loads the model from it. Everything stays on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .embedded_s3 import EmbeddedS3Server

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


def run_demo(address: str, server: str, workers: int, code_dir: Path | None) -> int:
    host, _, port = address.rpartition(":")
    work = Path(tempfile.mkdtemp(prefix="drum-servers-demo-")) if code_dir is None else code_dir
    print("demo: starting an S3-compatible server on 127.0.0.1 (moto) …", file=sys.stderr)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with EmbeddedS3Server() as s3:
        upload_sample(s3.url)
        prepare_code_dir(work)
        env = {**os.environ, **lazy_loading_environ(s3.url), "CODE_DIR": str(work),
               "ADDRESS": address, "MAX_WORKERS": str(workers)}
        conf = ("drum_servers.gunicorn_conf" if server == "flask"
                else "drum_servers.gunicorn_uvicorn_conf")
        print(f"demo: serving {work} with gunicorn ({server}, {workers} workers) on {address}",
              file=sys.stderr)
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", f"python:{conf}"],
                                env=env)
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        try:
            while proc.poll() is None:
                try:
                    status, _ = _get(f"{base}/health/")
                except OSError:
                    status = 0
                if status == 200:
                    break
                time.sleep(0.2)
            if proc.poll() is None:
                print(
                    "\ndemo: ready. Try:\n"
                    f"  curl -s -X POST {base}/predictUnstructured/ "
                    "-H 'Content-Type: application/json' -d '{\"x\": [1, 2, 3]}'\n"
                    f"  curl -s {base}/info/\n"
                    "Press Ctrl-C to stop.\n",
                    file=sys.stderr,
                )
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(30) or 0
            except subprocess.TimeoutExpired:
                proc.kill()
                return 1
