from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, settings

from drum_servers.embedded_s3 import EmbeddedS3Server
from tests.faults import FaultInjector

# DRUM as the oracle needs its own venv: `make parity` builds it and sets DRUM_VENV.
collect_ignore = [] if os.environ.get("DRUM_VENV") else ["test_parity.py"]

ACCESS_KEY = "AKIATESTACCESSKEY01"
SECRET_CANARY = "SECRETCANARY-7f3a9c-do-not-print"
TOKEN_CANARY = "TOKENCANARY-b41e2d-do-not-print"


@dataclass
class S3Store:
    url: str
    faults: FaultInjector
    client: Any

    def bucket(self) -> str:
        name = f"bkt-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, body: bytes, **kwargs: Any) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body, **kwargs)


logging.getLogger("werkzeug").setLevel(logging.WARNING)

# No test may depend on the machine's speed: hypothesis neither times examples nor judges the
# data generation too slow on a loaded 2-core machine.
settings.register_profile("suite", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("suite")

pytest_plugins = ["tests.leakcheck"]


class _CanaryWatch(logging.Handler):
    """Sees every record of every test at DEBUG (botocore's included), fully formatted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if SECRET_CANARY in text or TOKEN_CANARY in text:
            self.leaks.append(text[:300])


@pytest.fixture(autouse=True)
def _no_secret_in_any_log() -> Iterator[None]:
    """Every test, whatever it does, must not let a canary secret reach a log record."""
    root = logging.getLogger()
    watch = _CanaryWatch()
    watch.setFormatter(logging.Formatter("%(name)s %(message)s"))
    previous = root.level
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(watch)
        root.setLevel(previous)
    assert watch.leaks == [], f"secret in a log record: {watch.leaks[0]}"


@pytest.fixture(scope="session")
def _s3_server() -> Iterator[tuple[EmbeddedS3Server, FaultInjector]]:
    faults = FaultInjector()
    server = EmbeddedS3Server(middleware=faults).start()
    yield server, faults
    faults.stopping.set()
    server.stop()


@pytest.fixture
def s3(_s3_server: tuple[EmbeddedS3Server, FaultInjector]) -> Iterator[S3Store]:
    server, faults = _s3_server
    faults.reset()
    client = boto3.client("s3", endpoint_url=server.url, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key="setup-only", region_name="us-east-1")
    yield S3Store(server.url, faults, client)
    faults.reset()


def lazy_env(url: str, bucket: str, files: dict[str, str], *, credential_id: str = "cred-1",
             extra_file_fields: dict[str, dict[str, Any]] | None = None,
             **env: str) -> dict[str, str]:
    """The DRUM environment contract for ``files`` (remote key -> localPath) in one bucket."""
    data = {
        "files": [
            {"remotePath": key, "localPath": local, "repositoryId": "repo-1",
             **(extra_file_fields or {}).get(key, {})}
            for key, local in files.items()
        ],
        "repositories": [{"repositoryId": "repo-1", "bucketName": bucket,
                          "credentialId": credential_id, "endpointUrl": url}],
    }
    secret_name = "MLOPS_REPOSITORY_SECRET_" + credential_id.upper().replace("-", "_")
    base = {
        "PATH": os.environ.get("PATH", ""),
        "MLOPS_LAZY_LOADING_DATA": json.dumps(data),
        secret_name: json.dumps({"credentialType": "s3", "awsAccessKeyId": ACCESS_KEY,
                                 "awsSecretAccessKey": SECRET_CANARY,
                                 "awsSessionToken": TOKEN_CANARY}),
        "LAZY_LOADING_PROGRESS_INTERVAL": "0.5",
    }
    base.update(env)
    return base


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-ish bytes so misplaced ranges are detected."""
    import random

    return random.Random(seed).randbytes(size)


def kill_9_once_journaled(proc: subprocess.Popen[bytes], journal_dir: Path, parts: int
                          ) -> set[int]:
    """SIGKILL ``proc`` once its resume journal records ``parts`` finished parts (or after 30
    s); return the parts it recorded by then."""
    from lazy_loading.cache import ResumeJournal

    deadline, done = time.monotonic() + 30, set[int]()
    while time.monotonic() < deadline and len(done) < parts:
        for path in journal_dir.glob("*.log"):
            found = ResumeJournal.read(path)
            if found is not None:
                done = found[1]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return done


def no_debris(code_dir: Path) -> list[str]:
    return [str(p) for p in code_dir.rglob("*.partial")]
