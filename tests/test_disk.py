"""Disk full: the pre-check refuses before any byte moves; a full disk mid-download is a clear
error with nothing half-written. Uses a small tmpfs, so it needs root (skipped otherwise)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazy_loading import DownloadError, LazyLoadingHandler
from tests.conftest import S3Store, lazy_env, no_debris, payload

MiB = 1024 * 1024


@contextlib.contextmanager
def _mounted(mount: Path, kind: str, options: str = "") -> Iterator[Path]:
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} needs root")
    result = subprocess.run(["mount", "-t", kind, *(["-o", options] if options else []), kind,
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {kind} here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with _mounted(tmp_path / "small", "tmpfs", "size=3m") as mount:
        yield mount


def test_free_space_precheck_refuses_before_any_byte(
    s3: S3Store, small_disk: Path
) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", payload(2 * MiB, 1))
    s3.put(bucket, "b.bin", payload(2 * MiB, 2))
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin", "b.bin": "b.bin"})
    with pytest.raises(DownloadError, match=r"not enough free disk space on .*small"):
        LazyLoadingHandler(code_dir=small_disk, environ=env).download_lazy_loading_files()
    assert s3.faults.ledger.gets() == 0
    assert not (small_disk / "a.bin").exists() and not (small_disk / "b.bin").exists()


def test_disk_full_mid_download_is_clear_and_leaves_nothing_half_written(
    s3: S3Store, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", payload(2 * MiB, 1))
    s3.put(bucket, "b.bin", payload(2 * MiB, 2))
    (small_disk / "keep.txt").write_text("unrelated file")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin", "b.bin": "b.bin"},
                   LAZY_LOADING_PART_SIZE="1MiB")
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(  # pre-check says yes
        f_blocks=real(p).f_blocks, f_bavail=1 << 40, f_frsize=1))
    with pytest.raises(DownloadError, match=r"No space left on device"):
        LazyLoadingHandler(code_dir=small_disk, environ=env).download_lazy_loading_files()
    assert (small_disk / "keep.txt").read_text() == "unrelated file"
    assert no_debris(small_disk) == []
    published = [p for p in ("a.bin", "b.bin") if (small_disk / p).exists()]
    for name in published:
        assert (small_disk / name).read_bytes() == payload(2 * MiB, 1 if name == "a.bin" else 2)


def test_a_killed_download_resumes_on_a_volume_under_twice_its_size(
    s3: S3Store, small_disk: Path
) -> None:
    import signal
    import sys
    import time

    from lazy_loading.cache import ResumeJournal
    from tests.faults import Rule

    bucket = s3.bucket()
    body = payload(2 * MiB, 7)
    s3.put(bucket, "a.bin", body)
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                   LAZY_LOADING_MAX_CONNECTIONS="1")
    s3.faults.add(Rule("throttle", key="a.bin", times=None, rate=512 * 1024))
    argv = [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(small_disk)]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    journal_dir = small_disk / ".lazy_loading" / "journal"
    deadline = time.monotonic() + 30
    resumable = False
    try:
        while time.monotonic() < deadline and not resumable:
            found = [ResumeJournal.read(p) for p in journal_dir.glob("*.log")]
            resumable = any(f is not None and f[1] for f in found)
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert resumable, "killed after one part was journaled"
    assert not (small_disk / "a.bin").exists()
    assert shutil.disk_usage(small_disk).free < 2 * MiB, "the partial file holds the room"
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (small_disk / "a.bin").read_bytes() == body
    assert no_debris(small_disk) == []


def test_a_full_disk_at_the_record_keeps_the_verified_file_and_restarts_work(
    s3: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills between the file and its record: neither the record attached to the
    file nor a record file fits. A tmpfs whose inodes run out exactly there, measured by a
    first download that fits, does it without patching a single call."""
    import logging

    bucket = s3.bucket()
    body = payload(1 * MiB, 9)
    s3.put(bucket, "a.bin", body)  # single-part, with the store's CRC32
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"})
    with _mounted(tmp_path / "roomy", "tmpfs", "size=3m") as roomy:
        LazyLoadingHandler(code_dir=roomy, environ=env).download_lazy_loading_files()
        inodes = 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(roomy))
    # A tmpfs's inodes also hold the room of its attributes: none is left for the record.
    with _mounted(tmp_path / "full", "tmpfs", f"size=3m,nr_inodes={inodes}") as full, \
            caplog.at_level(logging.WARNING, logger="lazy_loading"):
        fetched = s3.faults.ledger.body_bytes["a.bin"]
        LazyLoadingHandler(code_dir=full, environ=env).download_lazy_loading_files()
        assert (full / "a.bin").read_bytes() == body
        assert "its record could not be written (No space left on device)" in caplog.text
        assert s3.faults.ledger.body_bytes["a.bin"] == 2 * fetched
        results = LazyLoadingHandler(code_dir=full, environ=env).download_lazy_loading_files()
        assert [r.status for r in results] == ["cached"]
        assert s3.faults.ledger.body_bytes["a.bin"] == 2 * fetched, "verified, not fetched"
        assert no_debris(full) == []


def test_a_filesystem_without_user_attributes_keeps_records_in_files(
    s3: S3Store, tmp_path: Path
) -> None:
    """ramfs has no user attributes (as tmpfs before Linux 6.6, or some network filesystems):
    the records go to files, and a restart still fetches nothing."""
    bucket = s3.bucket()
    objects = {f"s{i}.bin": payload(1000 + i, seed=i) for i in range(3)}
    objects["big.bin"] = payload(2 * MiB + 1, seed=9)
    for key, body in objects.items():
        s3.put(bucket, key, body)
    env = lazy_env(s3.url, bucket, {k: f"art/{k}" for k in objects},
                   LAZY_LOADING_PART_SIZE="1MiB")
    with _mounted(tmp_path / "ram", "ramfs") as code_dir:
        LazyLoadingHandler(code_dir=code_dir, environ=env).download_lazy_loading_files()
        fetched = sum(s3.faults.ledger.body_bytes.values())
        assert len(list((code_dir / ".lazy_loading" / "manifest").glob("*.json"))) == 4
        results = LazyLoadingHandler(code_dir=code_dir, environ=env).download_lazy_loading_files()
        assert [r.status for r in results] == ["cached"] * 4
        assert sum(s3.faults.ledger.body_bytes.values()) == fetched, "a restart fetched bytes"
        for key, body in objects.items():
            assert (code_dir / "art" / key).read_bytes() == body
