"""Canary secrets never appear in logs (DEBUG everywhere), errors, reprs or CLI output."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lazy_loading import DownloadError, LazyLoadingHandler
from tests.conftest import SECRET_CANARY, TOKEN_CANARY, S3Store, lazy_env
from tests.faults import Rule


def _assert_clean(*texts: str) -> None:
    for text in texts:
        assert SECRET_CANARY not in text
        assert TOKEN_CANARY not in text


def test_debug_logs_of_success_and_failure_hold_no_secret(
    s3: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"a" * 3000)
    s3.put(bucket, "b.bin", b"b" * 3000)
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin", "b.bin": "b.bin"})
    with caplog.at_level(logging.DEBUG):
        handler = LazyLoadingHandler(code_dir=tmp_path / "ok", environ=env)
        handler.download_lazy_loading_files()
        # A GET refused on the engine's own signed path, then a HEAD refused there and asked
        # again through the boto3 client, whose DEBUG output prints every request header.
        s3.faults.add(Rule("status", method="GET", key="b.bin", times=None, status=403))
        failing = LazyLoadingHandler(code_dir=tmp_path / "fail", environ=env)
        with pytest.raises(DownloadError) as info:
            failing.download_lazy_loading_files()
        s3.faults.add(Rule("status", method="HEAD", key="b.bin", times=None, status=403))
        refused = LazyLoadingHandler(code_dir=tmp_path / "refused", environ=env)
        with pytest.raises(DownloadError) as head_info:
            refused.download_lazy_loading_files()
    assert "X-Amz-Security-Token" in caplog.text or "x-amz-security-token" in caplog.text.lower(), \
        "botocore DEBUG output was captured, so the check below is meaningful"
    chain = []
    for exc in (info.value, head_info.value):
        cause: BaseException | None = exc
        while cause is not None:
            chain.append(f"{cause!s} {cause!r}")
            cause = cause.__cause__ or cause.__context__
    _assert_clean(caplog.text, *chain, repr(handler), str(handler.progress()),
                  json.dumps(failing.progress().as_dict()), json.dumps(refused.progress().as_dict()))


def test_cli_verbose_output_holds_no_secret(s3: S3Store, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"a" * 100)
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin", "missing.bin": "m.bin"})
    result = subprocess.run(
        [sys.executable, "-m", "drum_servers.cli", "-v", "download", "--code-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "missing.bin" in result.stderr
    assert "DEBUG" in result.stderr
    _assert_clean(result.stdout, result.stderr)


def test_credentials_are_scrubbed_from_the_environment_but_survive_fork(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing
    import os

    from lazy_loading import config as config_module

    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"a" * 100)
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, credential_id="scrub-me")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(config_module, "_scrubbed", {})
    LazyLoadingHandler(code_dir=tmp_path / "one").download_lazy_loading_files()
    assert "MLOPS_REPOSITORY_SECRET_SCRUB_ME" not in os.environ
    child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.environ))"],
                           capture_output=True, text=True, timeout=30)
    assert "MLOPS_REPOSITORY_SECRET" not in child.stdout

    def in_forked_worker(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
        results = LazyLoadingHandler(code_dir=tmp_path / "two").download_lazy_loading_files()
        queue.put(results[0].status)

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=in_forked_worker, args=(queue,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == "fetched"


def test_scrubbing_can_be_turned_off(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"a")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, credential_id="keep-me",
                   LAZY_LOADING_SCRUB_ENV="false")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    LazyLoadingHandler(code_dir=tmp_path).download_lazy_loading_files()
    assert "MLOPS_REPOSITORY_SECRET_KEEP_ME" in os.environ


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_tracebacks_and_escaped_forms_of_a_secret_are_redacted(log_format: str) -> None:

    from lazy_loading.redact import register_secret

    secret = "TRACEBACK-SECRET-9f1c\nsecond line"  # a token read from a file, say
    register_secret(secret)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(message)s"))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"bad header value {secret!r} and raw {secret}")
        except ValueError:
            logger.exception("request failed with %r", secret)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text or "ValueError" in text
    assert "TRACEBACK-SECRET-9f1c" not in text, text
