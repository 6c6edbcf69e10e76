"""The node cache (``LAZY_LOADING_CACHE_DIR``): real processes, one store, many code dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lazy_loading import LazyLoadingHandler
from lazy_loading.cache import ResumeJournal
from lazy_loading.nodecache import OBJECTS_DIR
from tests.conftest import S3Store, kill_9_once_journaled, lazy_env, no_debris, payload
from tests.faults import Rule

MiB = 1024 * 1024


def _download(code_dir: Path) -> list[str]:
    return [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(code_dir)]


def _stored(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / OBJECTS_DIR).rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def _objects(s3: S3Store, count: int, size: int) -> tuple[str, dict[str, bytes]]:
    bucket = s3.bucket()
    objects = {f"part-{i}.bin": payload(size + i, seed=i) for i in range(count)}
    for key, body in objects.items():
        s3.put(bucket, key, body)
    return bucket, objects


def test_eight_pods_one_store_fetch_each_object_once_and_link_it(
    s3: S3Store, tmp_path: Path
) -> None:
    bucket, objects = _objects(s3, 3, 3 * MiB)
    cache = tmp_path / "node-cache"
    env = lazy_env(s3.url, bucket, {k: f"art/{k}" for k in objects},
                   LAZY_LOADING_PART_SIZE="1MiB", LAZY_LOADING_CACHE_DIR=str(cache))
    code_dirs = [tmp_path / f"pod-{i}" for i in range(8)]
    procs = [subprocess.Popen(_download(d), env=env, stderr=subprocess.PIPE, text=True)
             for d in code_dirs]
    outputs = [p.communicate(timeout=90)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outputs
    for key, body in objects.items():
        assert s3.faults.ledger.body_bytes[key] == len(body), f"{key} fetched more than once"
        inodes = set()
        for code_dir in code_dirs:
            target = code_dir / "art" / key
            assert target.read_bytes() == body
            st = target.stat()
            assert not st.st_mode & 0o222, "a shared inode is read-only"
            inodes.add(st.st_ino)
        assert len(inodes) == 1, "every pod links the one stored object"
    assert len(_stored(cache)) == 3
    assert no_debris(cache) == [] and all(no_debris(d) == [] for d in code_dirs)


def test_a_fetch_killed_in_the_store_is_resumed_by_the_next_pod(
    s3: S3Store, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    body = payload(8 * MiB, seed=7)
    s3.put(bucket, "big.bin", body)
    cache = tmp_path / "node-cache"
    env = lazy_env(s3.url, bucket, {"big.bin": "big.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                   LAZY_LOADING_MAX_CONNECTIONS="2", LAZY_LOADING_CACHE_DIR=str(cache))
    s3.faults.add(Rule("throttle", key="big.bin", times=None, rate=2 * MiB))
    journal_dir = cache / ".lazy_loading" / "journal"
    first = subprocess.Popen(_download(tmp_path / "pod-a"), env=env, stderr=subprocess.DEVNULL)
    done = kill_9_once_journaled(first, journal_dir, 3)
    assert len(done) >= 3, "the first pod made progress before it was killed"
    found = ResumeJournal.read(next(journal_dir.glob("*.log")))
    assert found is not None
    journal_done = found[1]

    s3.faults.reset()
    second = subprocess.run(_download(tmp_path / "pod-b"), env=env, capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "pod-b" / "big.bin").read_bytes() == body
    requested = {int(rng.split("=")[1].split("-")[0]) // MiB
                 for method, key, rng, _ in s3.faults.ledger.requests
                 if method == "GET" and key == "big.bin" and rng}
    assert requested == set(range(8)) - journal_done, "only the missing ranges"
    assert no_debris(cache) == []


def test_eviction_keeps_what_code_dirs_use_while_another_pod_links(
    s3: S3Store, tmp_path: Path
) -> None:
    size = 2 * MiB
    bucket, objects = _objects(s3, 3, size)
    cache = tmp_path / "node-cache"
    keys = sorted(objects)

    def env(files: list[str], budget: int | None = None) -> dict[str, str]:
        extra = {"LAZY_LOADING_CACHE_MAX_BYTES": str(budget)} if budget is not None else {}
        return lazy_env(s3.url, bucket, {k: k for k in files}, LAZY_LOADING_CACHE_DIR=str(cache),
                        **extra)

    gone = tmp_path / "pod-gone"
    subprocess.run(_download(gone), env=env(keys[:2]), check=True, timeout=60,
                   capture_output=True)
    for path in gone.rglob("*.bin"):  # the pod that used them went away
        path.unlink()
    runs = [(tmp_path / "pod-small-budget", env([keys[2]], budget=size + 10)),
            (tmp_path / "pod-linking", env([keys[0]]))]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda run: subprocess.run(
            _download(run[0]), env=run[1], capture_output=True, text=True, timeout=60), runs))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert (tmp_path / "pod-small-budget" / keys[2]).read_bytes() == objects[keys[2]]
    assert (tmp_path / "pod-linking" / keys[0]).read_bytes() == objects[keys[0]]
    stored = _stored(cache)
    assert all(p.stat().st_nlink > 1 for p in stored), "only objects no code dir uses go"
    assert len(stored) == 2, "the unused object was evicted, the two in use stayed"
    assert "evicted" in results[0].stderr


def test_an_unusable_cache_dir_falls_back_to_the_code_dir_with_a_warning(
    s3: S3Store, tmp_path: Path
) -> None:
    bucket, objects = _objects(s3, 1, MiB)
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("")
    env = lazy_env(s3.url, bucket, {k: k for k in objects},
                   LAZY_LOADING_CACHE_DIR=str(not_a_dir))
    result = subprocess.run(_download(tmp_path / "pod"), env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cannot be used" in result.stderr and "downloading into the code dir" in result.stderr
    for key, body in objects.items():
        assert (tmp_path / "pod" / key).read_bytes() == body


def test_a_tampered_stored_object_is_detected_by_its_sha256(
    s3: S3Store, tmp_path: Path, caplog: object
) -> None:
    import hashlib

    bucket = s3.bucket()
    body = payload(MiB, seed=3)
    s3.put(bucket, "m.bin", body)
    cache = tmp_path / "node-cache"
    env = lazy_env(s3.url, bucket, {"m.bin": "m.bin"}, LAZY_LOADING_CACHE_DIR=str(cache),
                   extra_file_fields={"m.bin": {"sha256": hashlib.sha256(body).hexdigest()}})
    LazyLoadingHandler(code_dir=tmp_path / "pod-a", environ=env).download_lazy_loading_files()
    [stored] = _stored(cache)
    st = stored.stat()
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as file:  # other bytes, same size and mtime
        file.write(b"\x00" * 16)
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(stored, 0o444)

    results = LazyLoadingHandler(code_dir=tmp_path / "pod-b",
                                 environ=env).download_lazy_loading_files()
    assert (tmp_path / "pod-b" / "m.bin").read_bytes() == body
    assert [r.status for r in results] == ["fetched"]
    assert "no longer match the configured sha256" in caplog.text  # type: ignore[attr-defined]
