"""The engine against a real S3 server on loopback: correctness, caching, faults."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from lazy_loading import ConfigError, DownloadError, LazyLoadingHandler
from tests.conftest import S3Store, lazy_env, no_debris, payload
from tests.faults import MisbehavingStore, Rule

MiB = 1024 * 1024


def _setup(s3: S3Store, objects: dict[str, bytes], locals_: dict[str, str] | None = None,
           **env: str) -> tuple[str, dict[str, str]]:
    bucket = s3.bucket()
    for key, body in objects.items():
        s3.put(bucket, key, body)
    files = locals_ or {key: key for key in objects}
    return bucket, lazy_env(s3.url, bucket, files, **env)


def test_happy_path_nested_dirs_zero_byte_and_multipart(s3: S3Store, tmp_path: Path) -> None:
    objects = {
        "models/weights.bin": payload(5 * MiB + 123, seed=1),
        "models/config/model.json": b'{"bias": 3}',
        "empty.txt": b"",
    }
    _, env = _setup(s3, objects, {"models/weights.bin": "artifacts/deep/w.bin",
                                  "models/config/model.json": "artifacts/model.json",
                                  "empty.txt": "e/empty.txt"},
                    LAZY_LOADING_PART_SIZE="1MiB")
    results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()

    assert (tmp_path / "artifacts/deep/w.bin").read_bytes() == objects["models/weights.bin"]
    assert (tmp_path / "artifacts/model.json").read_bytes() == objects["models/config/model.json"]
    assert (tmp_path / "e/empty.txt").read_bytes() == b""
    assert {r.status for r in results} == {"fetched"}
    assert no_debris(tmp_path) == []
    ranged = [r for m, k, r, _ in s3.faults.ledger.requests if k == "models/weights.bin" and r]
    assert len(ranged) == 6, "a 5 MiB file at 1 MiB parts is fetched as 6 ranged GETs"
    assert s3.faults.ledger.gets("empty.txt") == 1, \
        "a HEAD saying 0 bytes is confirmed by one GET, never trusted alone"


def _one_file_in_1_mib_parts_over_one_connection(tmp_path: Path, body: bytes
                                                 ) -> MisbehavingStore:
    """``body`` downloaded as ``a.bin`` from a keep-alive store (moto's server closes every
    connection), in 1 MiB parts on a budget of one connection; the store, for its requests."""
    with MisbehavingStore({"a.bin": body}) as store:
        env = lazy_env(store.url, "bucket", {"a.bin": "a.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                       LAZY_LOADING_MAX_CONNECTIONS="1")
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    return store


def test_parts_reuse_one_connection(tmp_path: Path) -> None:
    """Each part must not pay a new TCP (and, against S3, TLS) handshake.

    moto's werkzeug server closes every connection, so this uses a keep-alive HTTP/1.1 store.
    """
    body = payload(6 * MiB, seed=4)
    store = _one_file_in_1_mib_parts_over_one_connection(tmp_path, body)
    assert (tmp_path / "a.bin").read_bytes() == body
    assert [m for m, _ in store.requests] == ["HEAD"] + ["GET"] * 6
    ports = {port for _, port in store.requests}
    assert len(ports) == 1, f"HEAD and 6 GETs should share one connection, used {len(ports)}"


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts ``os.splice`` moved out of sockets during the test: the kernel's path
    for a body with no digest to feed (``lazy_loading/splice.py``)."""
    moved: list[int] = []
    real = os.splice

    def counting(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        n = real(src, dst, count, *args, **kwargs)
        if not args and kwargs.get("offset_dst") is None:  # socket to pipe, not pipe to file
            moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counting)
    return moved


# The same faults on both ways a body reaches the file: read into a buffer (the store's CRC32
# is checked, so every byte is hashed) and moved by the kernel (nothing to hash).
_BODY_PATHS = pytest.mark.parametrize("checksums", ["true", "false"], ids=["copied", "spliced"])


def _took_path(checksums: str, spliced: list[int]) -> bool:
    return bool(spliced) == (checksums == "false")


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_large_bodies_with_nothing_to_hash_are_moved_by_the_kernel_over_one_connection(
    tmp_path: Path, spliced: list[int]
) -> None:
    """A store without checksums (SeaweedFS's multipart objects, an in-cluster MinIO): the
    kernel moves each 1 MiB part from the socket into the file, the bytes arrive as sent, and
    the connection still goes back to the pool after each part."""
    body = payload(6 * MiB + 123, seed=9)
    store = _one_file_in_1_mib_parts_over_one_connection(tmp_path, body)
    assert (tmp_path / "a.bin").read_bytes() == body
    assert len({port for _, port in store.requests}) == 1, store.requests
    assert 5 * MiB < sum(spliced) <= 6 * MiB, \
        "six 1 MiB parts moved by splice (less what came with their headers); the short last " \
        "part is read"
    assert no_debris(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
@pytest.mark.parametrize("refused", ["socket", "file"])
def test_where_the_kernel_cannot_splice_the_bodies_are_read_as_usual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """gVisor's sockets or a FUSE file answer ``splice`` with EINVAL: nothing is lost (bytes
    already in the pipe are read out of it) and the process reads every body from then on."""
    import errno

    from lazy_loading import splice

    monkeypatch.setattr(splice, "_unsupported", False, raising=False)
    real = os.splice
    calls: list[bool] = []

    def refusing(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        to_file = kwargs.get("offset_dst") is not None
        calls.append(to_file)
        if to_file == (refused == "file"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(os, "splice", refusing)
    body = payload(4 * MiB, seed=10)
    store = _one_file_in_1_mib_parts_over_one_connection(tmp_path, body)
    assert (tmp_path / "a.bin").read_bytes() == body
    assert len({port for _, port in store.requests}) == 1, "the connection is still reused"
    # Tried until refused, then never again. A splice from the socket may first find it empty
    # (EAGAIN, then a wait): a call, but no refusal.
    refusing_call = refused == "file"
    assert calls.count(refusing_call) == 1 and calls[-1] == refusing_call, calls
    assert no_debris(tmp_path) == []


def test_connections_the_store_dropped_while_idle_are_not_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store (or a balancer in front of it) closes idle keep-alive connections without
    saying so: the next request must take a new connection, not fail and wait for a retry."""
    import logging

    objects = {f"s{i}.bin": payload(1000 + i, seed=i) for i in range(6)}
    objects["big.bin"] = payload(3 * MiB, seed=7)
    with MisbehavingStore(objects, "drop-idle") as store, \
            caplog.at_level(logging.WARNING, logger="lazy_loading"):
        env = lazy_env(store.url, "bucket", {k: k for k in objects},
                       LAZY_LOADING_PART_SIZE="1MiB", LAZY_LOADING_MAX_CONNECTIONS="2")
        for _ in range(2):  # a cold start, then a warm one
            LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())
    assert "retrying" not in caplog.text
    assert sorted(m for m, _ in store.requests) == ["GET"] * 9 + ["HEAD"] * 14, store.requests


def test_a_chunked_body_cut_short_is_fetched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy that re-encodes bodies chunked, and drops a connection inside one: the file is
    fetched again and published whole, as any connection cut is, never failed for good nor
    published short."""
    import logging

    objects = {"small.bin": payload(5000, seed=1), "big.bin": payload(3 * MiB, seed=2)}
    with MisbehavingStore(objects, "chunked-cut-once") as store, \
            caplog.at_level(logging.WARNING, logger="lazy_loading"):
        env = lazy_env(store.url, "bucket", {k: k for k in objects},
                       LAZY_LOADING_PART_SIZE="1MiB")
        results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())
    assert {r.status for r in results} == {"fetched"}
    assert "retrying" in caplog.text
    assert no_debris(tmp_path) == []


def test_second_call_in_process_returns_at_once(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": payload(1000)})
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    handler.download_lazy_loading_files()
    before = len(s3.faults.ledger.requests)
    handler.download_lazy_loading_files()
    assert len(s3.faults.ledger.requests) == before


async def _ticks_during(call: Callable[[], object]) -> int:
    """How often a 10 ms ticker on the same loop ran while ``call`` (sync or async) ran."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    result = call()
    if inspect.isawaitable(result):
        await result
    task.cancel()
    return ticks


def test_sync_call_inside_running_loop(s3: S3Store, tmp_path: Path) -> None:
    body = payload(3 * MiB, seed=2)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("throttle", key="a.bin", times=None, rate=8 * MiB))
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    ticks = asyncio.run(_ticks_during(handler.download_lazy_loading_files))
    assert (tmp_path / "a.bin").read_bytes() == body
    assert ticks <= 2, "the sync bridge blocks the caller's loop (hence the async API)"


def test_async_api_does_not_block_the_loop(s3: S3Store, tmp_path: Path) -> None:
    body = payload(4 * MiB, seed=3)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("throttle", key="a.bin", times=None, rate=8 * MiB))
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    ticks = asyncio.run(_ticks_during(handler.download_lazy_loading_files_async))
    assert (tmp_path / "a.bin").read_bytes() == body
    assert ticks >= 10, "the event loop kept running while the download was in progress"


def test_exception_propagates_through_bridge_inside_a_loop(s3: S3Store, tmp_path: Path) -> None:
    bucket, env = _setup(s3, {"present.bin": b"x" * 10})
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    data["files"].append({"remotePath": "missing.bin", "localPath": "m.bin",
                          "repositoryId": "repo-1"})
    env["MLOPS_LAZY_LOADING_DATA"] = json.dumps(data)

    async def main() -> None:
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()

    with pytest.raises(DownloadError) as info:
        asyncio.run(main())
    assert f"s3://{bucket}/missing.bin" in str(info.value)
    assert "404" in str(info.value)
    assert "m.bin" in info.value.failures


def test_missing_object_fails_fast_before_any_body_moves(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"big.bin": payload(4 * MiB)})
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    data["files"].append({"remotePath": "nope/missing.bin", "localPath": "missing.bin",
                          "repositoryId": "repo-1"})
    env["MLOPS_LAZY_LOADING_DATA"] = json.dumps(data)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"nope/missing\.bin.*404"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert time.monotonic() - started < 5
    assert s3.faults.ledger.gets() == 0, "no body is transferred when any object is missing"
    assert not (tmp_path / "big.bin").exists()
    assert no_debris(tmp_path) == []


def test_forbidden_fails_fast_without_retry_storm(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": payload(2 * MiB)}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("status", method="GET", key="a.bin", times=None, status=403))
    with pytest.raises(DownloadError, match="403"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert s3.faults.ledger.gets("a.bin") <= 2, "403 is not retried"
    assert not (tmp_path / "a.bin").exists()
    assert no_debris(tmp_path) == []


def test_5xx_bursts_are_retried(s3: S3Store, tmp_path: Path) -> None:
    body = payload(3 * MiB, seed=5)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("status", method="HEAD", key="a.bin", times=2, status=500))
    s3.faults.add(Rule("status", method="GET", key="a.bin", times=4, status=503))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body


@_BODY_PATHS
def test_cut_bodies_are_retried_and_never_published_torn(
    s3: S3Store, tmp_path: Path, checksums: str, spliced: list[int]
) -> None:
    body = payload(3 * MiB, seed=6)
    _, env = _setup(s3, {"a.bin": body, "small.bin": b"s" * 5000}, LAZY_LOADING_PART_SIZE="1MiB",
                    LAZY_LOADING_VERIFY_CHECKSUMS=checksums)
    s3.faults.add(Rule("cut", key="a.bin", times=3, after_bytes=300_000))
    s3.faults.add(Rule("cut", key="small.bin", times=2, after_bytes=100))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body
    assert (tmp_path / "small.bin").read_bytes() == b"s" * 5000
    assert _took_path(checksums, spliced)


@_BODY_PATHS
def test_stalled_body_is_detected_and_retried(
    s3: S3Store, tmp_path: Path, checksums: str, spliced: list[int]
) -> None:
    body = payload(2 * MiB, seed=7)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB",
                    LAZY_LOADING_STALL_TIMEOUT="1", LAZY_LOADING_VERIFY_CHECKSUMS=checksums)
    s3.faults.add(Rule("stall", key="a.bin", times=1, after_bytes=1000, seconds=30))
    started = time.monotonic()
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body
    assert time.monotonic() - started < 15
    assert _took_path(checksums, spliced)


def test_lying_content_range_is_retried(s3: S3Store, tmp_path: Path) -> None:
    body = payload(2 * MiB, seed=8)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("bad_range", key="a.bin", times=2))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body


def test_warm_run_fetches_zero_body_bytes(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": payload(2 * MiB), "b.bin": payload(1000, 2)},
                    LAZY_LOADING_PART_SIZE="1MiB")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    s3.faults.ledger.body_bytes.clear()
    results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert {r.status for r in results} == {"cached"}
    assert sum(s3.faults.ledger.body_bytes.values()) == 0


def test_a_warm_start_awaited_on_the_callers_loop_leaves_no_thread_behind(
    s3: S3Store, tmp_path: Path
) -> None:
    """A server awaiting the download in its own loop (a FastAPI lifespan) keeps running, and
    may fork next: the warm start's one blocking step must not leave a thread in its loop."""
    import threading

    _, env = _setup(s3, {"a.bin": payload(2 * MiB), "b.bin": payload(1000, 2)},
                    LAZY_LOADING_PART_SIZE="1MiB")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()

    def threads() -> list[str]:  # but the store's, which answer each request on a thread
        return sorted(t.name for t in threading.enumerate() if "process_request" not in t.name)

    async def serve() -> tuple[list[str], list[str]]:
        before = threads()
        results = await LazyLoadingHandler(
            code_dir=tmp_path, environ=env).download_lazy_loading_files_async()
        assert {r.status for r in results} == {"cached"}
        return before, threads()

    before, after = asyncio.run(serve())
    assert after == before


def test_each_file_is_published_with_its_record_and_no_record_file_is_made(
    s3: S3Store, tmp_path: Path
) -> None:
    """Where the filesystem has user attributes, a file and its record go in by one rename,
    and a cold start creates no inode per file besides the file itself."""
    import json
    import os

    from lazy_loading.cache import RECORD_ATTRIBUTE, Manifest

    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        pytest.skip("no user attributes on this filesystem")
    probe.unlink()
    objects = {"a.bin": payload(2 * MiB + 5), "d/b.bin": payload(1000, 2), "c.bin": b""}
    _, env = _setup(s3, objects, LAZY_LOADING_PART_SIZE="1MiB")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    state = tmp_path / ".lazy_loading"
    assert [p for p in state.rglob("*") if p.is_file() and p.parent.name != "locks"] == []
    for key in objects:
        record = json.loads(os.getxattr(tmp_path / key, RECORD_ATTRIBUTE))
        assert record["target"] == str(tmp_path / key)
        entry = Manifest(state).lookup(tmp_path / key)
        assert entry is not None
        assert record["entry"] == json.loads(json.dumps(asdict(entry))), "every field, as is"
    s3.faults.ledger.body_bytes.clear()
    results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert {r.status for r in results} == {"cached"}
    assert sum(s3.faults.ledger.body_bytes.values()) == 0
    (tmp_path / "a.bin").unlink()
    (tmp_path / "a.bin").write_bytes(objects["a.bin"])  # same bytes, but not what we published
    results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r.status for r in results] == ["cached", "cached", "cached"]


def test_changed_object_is_fetched_again(s3: S3Store, tmp_path: Path) -> None:
    bucket, env = _setup(s3, {"a.bin": b"version-1", "b.bin": b"unchanged"})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    s3.put(bucket, "a.bin", b"version-2 is longer")
    before = len(s3.faults.ledger.requests)
    results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r.status for r in results] == ["fetched", "cached"]
    assert (tmp_path / "a.bin").read_bytes() == b"version-2 is longer"
    heads = sorted(k for m, k, _, _ in s3.faults.ledger.requests[before:] if m == "HEAD")
    assert heads == ["a.bin", "b.bin"], "the warm start's HEADs are not sent again"


def test_locally_modified_file_is_fetched_again(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": b"original"})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    (tmp_path / "a.bin").write_bytes(b"tampered!")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == b"original"


def test_store_refusing_connections_falls_back_to_intact_local_copies_of_the_same_objects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with MisbehavingStore({"a.bin": b"cached bytes"}) as store:
        env = lazy_env(store.url, "bkt", {"a.bin": "a.bin"})
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    # The store is gone now: connections are refused.
    with caplog.at_level(logging.WARNING, logger="lazy_loading"):
        results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r.status for r in results] == ["offline"]
    assert "unreachable" in caplog.text
    renamed = lazy_env(store.url, "bkt", {"b.bin": "a.bin"})  # same path, another object
    with pytest.raises(DownloadError, match=r"a\.bin: s3://bkt/b\.bin at http"):
        LazyLoadingHandler(code_dir=tmp_path, environ=renamed).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == b"cached bytes"


@pytest.mark.parametrize("change", ["nothing", "key", "bucket", "endpoint"])
def test_store_answering_503_serves_local_copies_only_of_what_the_config_names(
    change: str, s3: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bucket, env = _setup(s3, {"a.bin": b"version one"})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    other_bucket = s3.bucket()
    s3.put(bucket, "b.bin", b"version two")
    s3.put(other_bucket, "a.bin", b"version two")
    s3.faults.add(Rule("status", method="HEAD", status=503, times=None))
    data = env["MLOPS_LAZY_LOADING_DATA"]
    changed = {
        "nothing": data,
        "key": data.replace('"remotePath": "a.bin"', '"remotePath": "b.bin"'),
        "bucket": data.replace(bucket, other_bucket),
        "endpoint": data.replace(s3.url, s3.url.replace("127.0.0.1", "localhost")),
    }[change]
    assert changed != data or change == "nothing"
    now = {**env, "MLOPS_LAZY_LOADING_DATA": changed, "LAZY_LOADING_MAX_ATTEMPTS": "2"}
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=now)
    if change == "nothing":
        assert [r.status for r in handler.download_lazy_loading_files()] == ["offline"]
    else:
        with pytest.raises(DownloadError, match=r"a\.bin: .*HTTP 503"):
            handler.download_lazy_loading_files()
        assert "has no intact local copy" in caplog.text
    assert (tmp_path / "a.bin").read_bytes() == b"version one"


def test_unreachable_store_without_cache_fails_naming_the_endpoint(tmp_path: Path) -> None:
    env = lazy_env("http://127.0.0.1:9", "bucket-x", {"a.bin": "a.bin"})
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert time.monotonic() - started < 10


def test_sha256_mismatch_is_never_published_and_its_descriptor_closed_once(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second close of the same number would close whatever another thread opened meanwhile
    # (another file's temp file), and its writes would then land nowhere or somewhere else.
    import os
    from collections import Counter

    from lazy_loading.publish import Publisher

    opened: list[int] = []
    closes: Counter[int] = Counter()
    real_prepare, real_close = Publisher.prepare, os.close

    def recording_prepare(self: Publisher, *args: Any) -> Any:
        journal, fd, dir_fd = real_prepare(self, *args)
        opened.append(fd)
        return journal, fd, dir_fd

    def recording_close(fd: int) -> None:
        if fd in opened:
            closes[fd] += 1
        real_close(fd)

    monkeypatch.setattr(Publisher, "prepare", recording_prepare)
    monkeypatch.setattr(os, "close", recording_close)
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"real bytes")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"},
                   extra_file_fields={"a.bin": {"sha256": "0" * 64}})
    with pytest.raises(DownloadError, match=r"sha256 mismatch"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    monkeypatch.undo()
    assert not (tmp_path / "a.bin").exists()
    assert no_debris(tmp_path) == []
    assert len(opened) == 1 and closes[opened[0]] == 1


def test_sha256_and_s3_checksum_verified(s3: S3Store, tmp_path: Path) -> None:
    import hashlib

    body = payload(3 * MiB, seed=9)
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", body, ChecksumAlgorithm="CRC32")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                   extra_file_fields={"a.bin": {"sha256": hashlib.sha256(body).hexdigest()}})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    from lazy_loading.cache import Manifest

    entry = asdict(Manifest(tmp_path / ".lazy_loading").lookup(tmp_path / "a.bin"))
    assert entry["checksum"][0] == "ChecksumCRC32"
    assert entry["sha256"] == hashlib.sha256(body).hexdigest()


def test_config_size_mismatch_fails_before_transfer(s3: S3Store, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", b"12345")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, extra_file_fields={"a.bin": {"size": 6}})
    with pytest.raises(DownloadError, match=r"files\[0\]\.size is 6"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert s3.faults.ledger.gets() == 0


def test_progress_snapshot_and_callback(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": payload(2 * MiB), "b.bin": payload(10)},
                    LAZY_LOADING_PART_SIZE="1MiB")
    seen = []
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env, progress_callback=seen.append)
    handler.download_lazy_loading_files()
    snap = handler.progress()
    assert snap.state.value == "done"
    assert (snap.files_done, snap.files_total) == (2, 2)
    assert snap.bytes_done == snap.bytes_total == 2 * MiB + 10
    assert seen and seen[-1].state.value == "done"


def test_object_replaced_mid_download_restarts_cleanly(s3: S3Store, tmp_path: Path) -> None:
    import threading

    v1, v2 = payload(4 * MiB, seed=11), payload(4 * MiB + 7, seed=12)
    bucket, env = _setup(s3, {"a.bin": v1}, LAZY_LOADING_PART_SIZE="1MiB",
                         LAZY_LOADING_MAX_CONNECTIONS="1")
    s3.faults.add(Rule("throttle", key="a.bin", times=2, rate=4 * MiB))
    replaced = threading.Timer(0.3, lambda: s3.put(bucket, "a.bin", v2))
    replaced.start()
    results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    replaced.join()
    assert (tmp_path / "a.bin").read_bytes() == v2, "never a mix of two versions"
    assert results[0].etag == s3.client.head_object(Bucket=bucket, Key="a.bin")["ETag"]
    assert no_debris(tmp_path) == []


@_BODY_PATHS
def test_first_fatal_error_cancels_the_rest_promptly(
    s3: S3Store, tmp_path: Path, checksums: str, spliced: list[int]
) -> None:
    _, env = _setup(s3, {"big.bin": payload(8 * MiB), "bad.bin": payload(2 * MiB, 1)},
                    LAZY_LOADING_PART_SIZE="1MiB", LAZY_LOADING_MAX_CONNECTIONS="4",
                    LAZY_LOADING_VERIFY_CHECKSUMS=checksums)
    s3.faults.add(Rule("throttle", key="big.bin", times=None, rate=256 * 1024))
    s3.faults.add(Rule("status", method="GET", key="bad.bin", times=None, status=403))
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert time.monotonic() - started < 8, "did not wait for the 8 MiB file at 1 MiB/s"
    assert list(info.value.failures) == ["bad.bin"]
    assert not (tmp_path / "big.bin").exists()
    assert no_debris(tmp_path) == []
    # Which path big.bin was on is not asserted: the 403 can stop it while its first part still
    # writes the bytes that came with the headers, before any splice.
    assert checksums == "false" or not spliced


@_BODY_PATHS
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_the_first_fatal_error_wakes_a_read_stalled_on_its_store(
    tmp_path: Path, checksums: str, close: bool
) -> None:
    """A store that sends a body's first bytes and then nothing: the 403 of another file must
    end the run at once, not after the stall timeout. Stores answering ``Connection: close``
    (moto's server) hand the socket from ``http.client``'s connection to its response."""
    import hashlib

    stalled, refused = payload(2 * MiB, seed=21), payload(2 * MiB, seed=22)
    sha256 = {"sha256": hashlib.sha256(stalled).hexdigest()}  # a digest to feed: no splice
    with MisbehavingStore({"stall.bin": stalled, "refused.bin": refused}, "stall-and-refuse",
                          close=close) as store:
        env = lazy_env(store.url, "bucket", {"stall.bin": "stall.bin", "refused.bin": "refused.bin"},
                       extra_file_fields={"stall.bin": sha256} if checksums == "true" else None,
                       LAZY_LOADING_PART_SIZE="1MiB", LAZY_LOADING_MAX_CONNECTIONS="4",
                       LAZY_LOADING_STALL_TIMEOUT="90", LAZY_LOADING_TIMEOUT="300")
        started = time.monotonic()
        with pytest.raises(DownloadError) as info:
            LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
        waited = time.monotonic() - started
    assert list(info.value.failures) == ["refused.bin"]
    assert waited < 45, f"waited {waited:.0f} s: the stalled read outlived the fatal error"
    assert not (tmp_path / "stall.bin").exists()
    assert no_debris(tmp_path) == []


def _small_files(count: int) -> dict[str, bytes]:
    return {f"s{i:02d}.bin": payload(3_000 + i, seed=40 + i) for i in range(count)}


def test_small_files_sharing_a_thread_stop_at_the_first_failure_and_name_it(
    s3: S3Store, tmp_path: Path
) -> None:
    """Single-part files are taken one after another by lanes (16 files over 2 connections);
    a 403 in the middle fails the run, names that file and leaves nothing torn."""
    objects = _small_files(16)
    _, env = _setup(s3, objects, LAZY_LOADING_MAX_CONNECTIONS="2")
    s3.faults.add(Rule("status", method="GET", key="s05.bin", times=None, status=403))
    s3.faults.add(Rule("cut", key="s02.bin", times=1, after_bytes=100))
    with pytest.raises(DownloadError) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert list(info.value.failures) == ["s05.bin"]
    assert not (tmp_path / "s05.bin").exists()
    for key, body in objects.items():
        assert not (tmp_path / key).exists() or (tmp_path / key).read_bytes() == body
    assert no_debris(tmp_path) == []
    s3.faults.reset()
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())


def test_a_small_file_another_process_is_fetching_is_waited_for_not_skipped(
    s3: S3Store, tmp_path: Path
) -> None:
    """A single-part file whose lock another process holds is handed back and waited for,
    while the lanes go on with the others."""
    import threading

    from lazy_loading.cache import target_lock
    from lazy_loading.handler import STATE_DIR_NAME

    objects = _small_files(16)
    _, env = _setup(s3, objects, LAZY_LOADING_MAX_CONNECTIONS="2")
    (tmp_path / STATE_DIR_NAME / "locks").mkdir(parents=True)
    other = target_lock(tmp_path / STATE_DIR_NAME, tmp_path / "s06.bin")
    assert other.try_acquire()
    releaser = threading.Timer(1.0, other.release)
    releaser.start()
    try:
        results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    finally:
        releaser.cancel()
        other.release()
    assert [r.display for r in results] == list(objects)
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())


def test_small_files_other_processes_hold_are_waited_for_side_by_side(
    s3: S3Store, tmp_path: Path
) -> None:
    """Two small files held elsewhere: the one let go first is fetched while the other (larger,
    so first in line) is still held, not after it."""
    import threading

    from lazy_loading.cache import target_lock
    from lazy_loading.handler import STATE_DIR_NAME

    objects = _small_files(8)
    _, env = _setup(s3, objects, LAZY_LOADING_MAX_CONNECTIONS="2")
    (tmp_path / STATE_DIR_NAME / "locks").mkdir(parents=True)
    first = target_lock(tmp_path / STATE_DIR_NAME, tmp_path / "s05.bin")
    later = target_lock(tmp_path / STATE_DIR_NAME, tmp_path / "s01.bin")
    assert first.try_acquire() and later.try_acquire()
    while_held: list[bool] = []

    def let_go() -> None:
        later.release()
        deadline = time.monotonic() + 20
        while not (tmp_path / "s01.bin").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        while_held.append((tmp_path / "s01.bin").exists())
        first.release()

    releaser = threading.Timer(0.5, let_go)
    releaser.start()
    try:
        results = LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    finally:
        releaser.join(timeout=30)
    assert while_held == [True], "s01.bin waited for s05.bin's holder"
    assert [r.display for r in results] == list(objects)
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())


def test_a_store_that_answers_slowly_keeps_every_connection_busy_to_the_end(
    s3: S3Store, tmp_path: Path
) -> None:
    """Lanes are halved only while the process keeps a CPU core busy; a store that takes
    0.2 s to answer each GET keeps it waiting, so the last GETs still go 8 at a time."""
    objects = _small_files(48)
    _, env = _setup(s3, objects, LAZY_LOADING_MAX_CONNECTIONS="8")
    s3.faults.add(Rule("headers", method="GET", times=None, seconds=0.2))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    waiting = s3.faults.ledger.slow_answers_waiting
    assert len(waiting) == 48
    assert max(waiting[-16:]) == 8, waiting
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())


def test_by_default_heads_start_on_16_lanes_and_a_slow_store_gets_32(
    s3: S3Store, tmp_path: Path
) -> None:
    """Lanes start on 16 of the default 32 connections: more only share the GIL from a store
    that keeps up. A store that keeps every HEAD waiting 1 s gets the other 32 at once, on
    trial."""
    objects = _small_files(48)
    _, env = _setup(s3, objects)
    s3.faults.add(Rule("headers", method="HEAD", times=None, seconds=1.0))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    waiting = s3.faults.ledger.slow_answers_waiting
    arrived = s3.faults.ledger.slow_answers_at
    assert len(waiting) == 48
    assert arrived[15] - arrived[0] < 0.9, "fewer than 16 HEADs at first"
    assert arrived[16] - arrived[0] >= 0.9, "more than 16 HEADs at first"
    assert max(waiting) == 32, waiting
    assert all((tmp_path / key).read_bytes() == body for key, body in objects.items())


def test_a_store_that_answers_slowly_gets_every_connection_for_a_files_parts(
    s3: S3Store, tmp_path: Path
) -> None:
    """GETs from a distant store (its HEAD took 50 ms) start on 8 connections, and take the
    whole budget while the process waits for the store: 32 parts answered in 1 s each end 16
    at a time. The ninth GET waits for a first answer (lower bounds the store's sleeps set: a
    slow machine cannot make this fail). The store runs in this process: the second keeps its
    CPU time per part small next to the wait."""
    s3.faults.add(Rule("headers", method="HEAD", times=None, seconds=0.05))
    waiting, arrived = _slow_gets_of_parts(s3, tmp_path, seed=77, slow_heads=1)
    assert arrived[7] - arrived[0] < 0.9, "fewer than 8 GETs at first"
    assert arrived[8] - arrived[0] >= 0.9, "more than 8 GETs at first"
    assert max(waiting) == 16, waiting


def test_gets_from_a_nearby_store_start_on_four_connections(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that answered a HEAD within ``NEARBY_SECONDS`` is on this machine or next to
    it: GETs start on 4, so the fifth waits for a first answer, then take the whole budget
    while the process waits. "Nearby" is widened to a minute here, so that a slow machine's
    HEAD cannot make the store look distant; what is tested is what follows from it."""
    import lazy_loading.lookup

    monkeypatch.setattr(lazy_loading.lookup, "NEARBY_SECONDS", 60.0)
    waiting, arrived = _slow_gets_of_parts(s3, tmp_path, seed=78)
    assert arrived[3] - arrived[0] < 0.9, "fewer than 4 GETs at first"
    assert arrived[4] - arrived[0] >= 0.9, "more than 4 GETs at first"
    assert max(waiting) == 16, waiting


def test_by_default_a_store_that_keeps_each_connection_waiting_gets_more_than_16(
    s3: S3Store, tmp_path: Path
) -> None:
    """The default budget is 32 connections: a distant store that keeps every GET waiting
    (as one that caps each connection does) gets 16 once the first 8 have shown it, then up
    to 32 on trial (kept while they pay: ``tests/test_lanes.py``)."""
    s3.faults.add(Rule("headers", method="HEAD", times=None, seconds=0.05))
    waiting, _ = _slow_gets_of_parts(s3, tmp_path, seed=79, parts=64, slow_heads=1, budget=None)
    assert max(waiting) > 16, waiting


def test_a_warm_start_that_finds_a_change_starts_gets_on_four_from_a_nearby_store(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm start sends every HEAD itself, so the HEAD stage after it sends none: its HEADs
    must tell the GETs how near the store is. "Nearby" is widened to a minute, as above."""
    import lazy_loading.lookup

    monkeypatch.setattr(lazy_loading.lookup, "NEARBY_SECONDS", 60.0)
    bucket, env = _setup(s3, {"model.bin": payload(32 * MiB, seed=80)},
                         LAZY_LOADING_MAX_CONNECTIONS="16", LAZY_LOADING_PART_SIZE="1MiB")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    changed = payload(32 * MiB, seed=81)
    s3.put(bucket, "model.bin", changed)
    s3.faults.add(Rule("headers", method="GET", times=None, seconds=1.0))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    arrived = s3.faults.ledger.slow_answers_at
    assert len(arrived) == 32
    assert arrived[3] - arrived[0] < 0.9, "fewer than 4 GETs at first"
    assert arrived[4] - arrived[0] >= 0.9, "more than 4 GETs at first"
    assert (tmp_path / "model.bin").read_bytes() == changed


def _slow_gets_of_parts(s3: S3Store, tmp_path: Path, seed: int, parts: int = 32,
                        slow_heads: int = 0, budget: str | None = "16"
                        ) -> tuple[list[int], list[float]]:
    """One file fetched as ``parts`` parts of 1 MiB on a ``budget`` of connections (None: the
    default), each GET answered in 1 s: for each GET, how many slow answers were waiting as it
    began, and when it arrived (the first ``slow_heads`` slow answers, the HEADs, left out).
    Checks every part came and the file is right."""
    objects = {"model.bin": payload(parts * MiB, seed=seed)}
    budgets = {} if budget is None else {"LAZY_LOADING_MAX_CONNECTIONS": budget}
    _, env = _setup(s3, objects, LAZY_LOADING_PART_SIZE="1MiB", **budgets)
    s3.faults.add(Rule("headers", method="GET", times=None, seconds=1.0))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    waiting = s3.faults.ledger.slow_answers_waiting[slow_heads:]
    arrived = s3.faults.ledger.slow_answers_at[slow_heads:]
    assert len(waiting) == parts
    assert (tmp_path / "model.bin").read_bytes() == objects["model.bin"]
    return waiting, arrived


def test_a_file_cancelled_while_its_temp_file_is_created_leaves_nothing_behind(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race CI hit on a full disk: one file fails while another's temp file is being created
    # in a thread. The cancelled task must still clean up what that thread made.
    import threading

    from lazy_loading.publish import Publisher

    real_prepare = Publisher.prepare
    slow_done = threading.Event()

    def slow_prepare(self: Publisher, transfer: Any, *args: Any) -> Any:
        result = real_prepare(self, transfer, *args)
        if transfer.display == "a.bin":
            time.sleep(0.5)
            slow_done.set()
        return result

    monkeypatch.setattr(Publisher, "prepare", slow_prepare)
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", payload(2 * MiB, 1))
    s3.put(bucket, "b.bin", b"small")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin", "b.bin": "b.bin"},
                   LAZY_LOADING_PART_SIZE="1MiB",
                   extra_file_fields={"b.bin": {"sha256": "0" * 64}})
    with pytest.raises(DownloadError, match=r"sha256 mismatch"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert slow_done.wait(5)
    time.sleep(0.1)  # an abandoned thread would now have returned its temp file to no one
    assert no_debris(tmp_path) == []
    assert list((tmp_path / ".lazy_loading" / "journal").glob("*")) == []
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "b.bin").exists()


def test_overall_deadline(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": payload(4 * MiB)}, LAZY_LOADING_PART_SIZE="1MiB",
                    LAZY_LOADING_TIMEOUT="1")
    s3.faults.add(Rule("throttle", key="a.bin", times=None, rate=128 * 1024))
    started = time.monotonic()
    with pytest.raises(DownloadError, match="LAZY_LOADING_TIMEOUT=1 s"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert time.monotonic() - started < 5
    assert not (tmp_path / "a.bin").exists()
    assert no_debris(tmp_path) == []


def test_not_enough_disk_space_fails_before_any_body(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import types

    _, env = _setup(s3, {"a.bin": payload(2 * MiB)})
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(  # 1 MiB of 10 free
        f_blocks=10 * MiB, f_bavail=1 * MiB, f_frsize=1))
    with pytest.raises(DownloadError, match=r"not enough free disk space .* need 2\.0 MiB"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert s3.faults.ledger.gets() == 0


@pytest.mark.parametrize("durable", [False, True])
def test_fsync_only_when_asked(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    import os

    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    _, env = _setup(s3, {"a.bin": payload(2 * MiB)}, LAZY_LOADING_PART_SIZE="1MiB",
                    LAZY_LOADING_FSYNC=str(durable).lower())
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").stat().st_size == 2 * MiB
    # Durable: at least the file, its record attached, and its directory.
    assert (len(calls) >= 2) if durable else (calls == [])


def test_lying_content_length_is_retried_never_published(s3: S3Store, tmp_path: Path) -> None:
    body = payload(2 * MiB, seed=13)
    _, env = _setup(s3, {"a.bin": body, "s.bin": b"x" * 500}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("bad_length", key="a.bin", times=2))
    s3.faults.add(Rule("bad_length", key="s.bin", times=1))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body
    assert (tmp_path / "s.bin").read_bytes() == b"x" * 500


def test_slow_store_keeps_reporting_progress(s3: S3Store, tmp_path: Path) -> None:
    body = payload(4 * MiB, seed=14)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB",
                    LAZY_LOADING_MAX_CONNECTIONS="2", LAZY_LOADING_STALL_TIMEOUT="1")
    s3.faults.add(Rule("throttle", key="a.bin", times=None, rate=1 * MiB))
    seen: list[int] = []
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env,
                                 progress_callback=lambda s: seen.append(s.bytes_done))
    handler.download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body
    assert handler.progress().retries == 0, "a slow but steady store is not a stall"
    assert len(set(seen)) >= 4 and seen == sorted(seen)


def test_cut_bodies_at_random_offsets_repeatedly(s3: S3Store, tmp_path: Path) -> None:
    import random

    rng = random.Random(1234)
    body = payload(4 * MiB, seed=15)
    _, env = _setup(s3, {"a.bin": body}, LAZY_LOADING_PART_SIZE="1MiB",
                    LAZY_LOADING_MAX_ATTEMPTS="20")
    for _ in range(8):
        s3.faults.add(Rule("cut", key="a.bin", times=1, after_bytes=rng.randrange(1, MiB)))
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    handler.download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body
    assert handler.progress().retries == 8


def test_unknown_host_is_fatal_and_names_the_endpoint() -> None:
    from botocore.exceptions import EndpointConnectionError

    from lazy_loading.s3io import FatalFailure, classify

    exc = EndpointConnectionError(
        endpoint_url="http://nowhere.invalid:9000/b/k",
        error="[Errno -2] Name or service not known")
    failure = classify(exc, "s3://b/k at http://nowhere.invalid:9000")
    assert isinstance(failure, FatalFailure)
    assert "nowhere.invalid:9000" in failure.message and "resolve" in failure.message


def test_two_repositories_with_their_own_credentials(s3: S3Store, tmp_path: Path) -> None:
    first, second = s3.bucket(), s3.bucket()
    s3.put(first, "a.bin", b"from the first bucket")
    s3.put(second, "b.bin", b"from the second bucket")
    env = lazy_env(s3.url, first, {"a.bin": "a.bin"}, credential_id="cred-a")
    env.update({k: v for k, v in lazy_env(s3.url, second, {}, credential_id="cred-b").items()
                if k.startswith("MLOPS_REPOSITORY_SECRET_")})
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    data["repositories"].append({"repositoryId": "repo-2", "bucketName": second,
                                 "credentialId": "cred-b", "endpointUrl": s3.url})
    data["files"].append({"remotePath": "b.bin", "localPath": "sub/b.bin", "repositoryId": "repo-2"})
    env["MLOPS_LAZY_LOADING_DATA"] = json.dumps(data)
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == b"from the first bucket"
    assert (tmp_path / "sub/b.bin").read_bytes() == b"from the second bucket"


def test_target_in_an_allowed_root_outside_the_code_dir(s3: S3Store, tmp_path: Path) -> None:
    code_dir, shared = tmp_path / "code", tmp_path / "shared-models"
    code_dir.mkdir()
    bucket = s3.bucket()
    s3.put(bucket, "w.bin", payload(2 * MiB, 21))
    env = lazy_env(s3.url, bucket, {"w.bin": str(shared / "w.bin")},
                   LAZY_LOADING_ALLOWED_ROOTS=str(shared), LAZY_LOADING_PART_SIZE="1MiB")
    results = LazyLoadingHandler(code_dir=code_dir, environ=env).download_lazy_loading_files()
    assert (shared / "w.bin").read_bytes() == payload(2 * MiB, 21)
    assert results[0].display == str(shared / "w.bin")
    assert no_debris(shared) == []
    warm = LazyLoadingHandler(code_dir=code_dir, environ=env).download_lazy_loading_files()
    assert warm[0].status == "cached", "the manifest under the code dir covers it"


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME"])
def test_multipart_crc_is_verified_from_part_crcs_without_reading_back(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    from lazy_loading import verify
    from lazy_loading.cache import Manifest

    def no_read_back(*args: object) -> None:
        raise AssertionError("the file was read back")

    monkeypatch.setattr(verify, "hash_fd", no_read_back)
    body = payload(5 * MiB + 17, seed=31)
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", body, ChecksumAlgorithm=algorithm)
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, LAZY_LOADING_PART_SIZE="1MiB")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "a.bin").read_bytes() == body
    entry = Manifest(tmp_path / ".lazy_loading").lookup(tmp_path / "a.bin")
    assert entry is not None and entry.checksum is not None
    assert entry.checksum[0] == f"Checksum{algorithm}"


@pytest.mark.parametrize("good", [True, False])
def test_multipart_sha256_is_hashed_part_by_part_in_order_not_read_back(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good: bool
) -> None:
    import hashlib

    from lazy_loading import verify

    hashed: list[tuple[int, int]] = []
    real_hash_fd = verify.hash_fd

    def recording(fd: int, size: int, digests: Any, cancel: Any, offset: int = 0) -> None:
        hashed.append((offset, size))
        real_hash_fd(fd, size, digests, cancel, offset)

    monkeypatch.setattr(verify, "hash_fd", recording)
    body = payload(6 * MiB + 5, seed=33)
    digest = hashlib.sha256(body).hexdigest() if good else "0" * 64
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", body)
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, LAZY_LOADING_PART_SIZE="1MiB",
                   LAZY_LOADING_MAX_CONNECTIONS="4",
                   extra_file_fields={"a.bin": {"sha256": digest}})
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    if good:
        handler.download_lazy_loading_files()
        assert (tmp_path / "a.bin").read_bytes() == body
    else:
        with pytest.raises(DownloadError, match=r"sha256 mismatch"):
            handler.download_lazy_loading_files()
        assert not (tmp_path / "a.bin").exists()
    assert hashed == [(i * MiB, min(MiB, len(body) - i * MiB)) for i in range(7)], \
        "each part hashed once, in order, and no second read of the whole file"


@pytest.mark.parametrize("size", [3000, 5 * MiB])
def test_corrupted_bytes_fail_the_checksum_and_are_never_published(
    s3: S3Store, tmp_path: Path, size: int
) -> None:
    bucket = s3.bucket()
    s3.put(bucket, "a.bin", payload(size, seed=32), ChecksumAlgorithm="CRC64NVME")
    env = lazy_env(s3.url, bucket, {"a.bin": "a.bin"}, LAZY_LOADING_PART_SIZE="1MiB")
    s3.faults.add(Rule("corrupt", key="a.bin", times=1))
    with pytest.raises(DownloadError, match=r"ChecksumCRC64NVME mismatch"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert not (tmp_path / "a.bin").exists()
    assert no_debris(tmp_path) == []


@pytest.mark.parametrize(("planted", "expected"), [
    ("file", r"\.lazy_loading is not a directory"),
    ("state symlink", r"\.lazy_loading is a symlink"),
    ("locks symlink", r"\.lazy_loading/locks is a symlink"),
])
def test_a_state_dir_that_is_not_a_real_directory_is_refused_before_any_request(
    planted: str, expected: str, s3: S3Store, tmp_path: Path
) -> None:
    # A file where the cache directory must go, or a link that would put manifests and locks
    # (and every write and delete that follows) somewhere else; root ignores permission bits.
    code_dir, outside = tmp_path / "code", tmp_path / "outside"
    code_dir.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    _, env = _setup(s3, {"a.bin": b"x"})
    state = code_dir / ".lazy_loading"
    if planted == "file":
        state.write_text("not a directory")
    elif planted == "state symlink":
        state.symlink_to(outside)
    else:
        state.mkdir()
        (state / "locks").symlink_to(outside)
    with pytest.raises(ConfigError, match=expected):
        LazyLoadingHandler(code_dir=code_dir, environ=env).download_lazy_loading_files()
    assert [r for r in s3.faults.ledger.requests if r[0] in ("HEAD", "GET")] == []
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"], "nothing written there"


def test_parent_that_is_a_file_is_a_clear_error(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"a.bin": b"x"}, {"a.bin": "blocker/a.bin"})
    (tmp_path / "blocker").write_text("a file, not a directory")
    with pytest.raises(DownloadError, match=r"blocker is a symlink or not a directory on the way"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()


def test_a_zero_length_head_never_replaces_an_intact_artifact(s3: S3Store, tmp_path: Path) -> None:
    body = payload(300_000, seed=5)
    bucket, env = _setup(s3, {"model.bin": body})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    s3.put(bucket, "model.bin", body + b"v2")  # a new version, so the cached copy is stale
    s3.faults.add(Rule("headers", method="HEAD", times=None,  # no checksum to catch it either
                       headers={"Content-Length": "0", "x-amz-checksum-crc32": None}))
    with pytest.raises(DownloadError, match=r"HEAD said 0 bytes but GET sends 300002"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "model.bin").read_bytes() == body
    assert s3.faults.ledger.gets("model.bin") == 2, "one GET at first, one to check the HEAD"


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Content-Length": None}, r"HEAD returned no valid Content-Length"),
    ({"ETag": None}, r"HEAD returned no ETag"),
])
def test_a_head_missing_what_the_download_needs_fails_once_in_one_line(
    headers: dict[str, str | None], expected: str, s3: S3Store, tmp_path: Path
) -> None:
    _, env = _setup(s3, {"model.bin": b"x" * 100})
    s3.faults.add(Rule("headers", method="HEAD", times=None, headers=headers))
    with pytest.raises(DownloadError, match=expected) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert "\n" not in str(info.value)
    heads = [r for r in s3.faults.ledger.requests if r[0] == "HEAD"]
    assert len(heads) == 1, "not retried: asking again cannot help"


def test_store_error_text_is_one_bounded_line_without_secrets(s3: S3Store, tmp_path: Path) -> None:
    from tests.conftest import TOKEN_CANARY

    forged = (f"<Error><Code>Denied\nINFO forged log line {TOKEN_CANARY}</Code>"
              f"<Message>{'x' * 5000} {TOKEN_CANARY}</Message></Error>").encode()
    _, env = _setup(s3, {"model.bin": b"x" * 100})
    s3.faults.add(Rule("status", method="GET", status=403, times=None, body=forged))
    with pytest.raises(DownloadError) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    message = str(info.value)
    assert "\n" not in message and TOKEN_CANARY not in message and "forged" not in message
    assert len(message) < 400, message
    assert "HTTP 403 (unreadable code)" in message


def test_a_huge_error_body_is_not_read_whole(s3: S3Store, tmp_path: Path) -> None:
    huge = b"<Error><Code>SlowDown</Code><Message>" + b"y" * (160 * MiB) + b"</Message></Error>"
    _, env = _setup(s3, {"model.bin": b"x" * 100}, LAZY_LOADING_MAX_ATTEMPTS="1")
    s3.faults.add(Rule("status", method="GET", status=503, times=None, body=huge))
    with pytest.raises(DownloadError, match=r"HTTP 503"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    # What the server got rid of, socket buffers on both sides included (a few MiB each).
    assert s3.faults.ledger.body_bytes["model.bin"] < 40 * MiB, "the error body was read whole"


def test_identical_failures_over_many_files_are_grouped(s3: S3Store, tmp_path: Path) -> None:
    objects = {f"shard-{i:02d}.bin": b"x" for i in range(40)}
    _, env = _setup(s3, objects)
    s3.faults.add(Rule("status", method="HEAD", status=403, times=None))
    with pytest.raises(DownloadError) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    message = str(info.value)
    assert message.count("HTTP 403") == 1 and "40 files: HTTP 403" in message, message
    assert "first: shard-00.bin" in message
    assert len(info.value.failures) == 40


def test_retry_after_is_honoured(s3: S3Store, tmp_path: Path) -> None:
    _, env = _setup(s3, {"model.bin": b"x" * 100})
    s3.faults.add(Rule("status", method="GET", status=503, times=1, headers={"Retry-After": "2"}))
    started = time.monotonic()
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert time.monotonic() - started >= 2.0, "waited as long as the store asked"
    assert (tmp_path / "model.bin").read_bytes() == b"x" * 100


def test_names_up_to_name_max_download(s3: S3Store, tmp_path: Path) -> None:
    name = "n" * 250 + ".bin"
    _, env = _setup(s3, {"long.bin": b"long name"}, {"long.bin": name})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / name).read_bytes() == b"long name"


def test_many_files_stay_under_a_small_descriptor_limit(s3: S3Store, tmp_path: Path) -> None:
    import resource
    import subprocess
    import sys

    bucket = s3.bucket()
    objects = {f"f{i:03d}.bin": payload(5_000 + i, seed=i) for i in range(300)}
    for key, body in objects.items():
        s3.put(bucket, key, body)
    env = lazy_env(s3.url, bucket, {k: f"art/{k}" for k in objects},
                   LAZY_LOADING_MAX_CONNECTIONS="8")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 256  # well under the file count, well over what 8 connections need

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    result = subprocess.run(
        [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120, preexec_fn=lower,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for key, body in list(objects.items())[::37]:
        assert (tmp_path / "art" / key).read_bytes() == body


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_a_run_leaves_no_descriptor_of_the_code_dir_open(
    outcome: str, s3: S3Store, tmp_path: Path
) -> None:
    """Threads keep the directory they wrote into open for their next file; the run closes
    them all, whether it succeeds or fails, so a server does not carry them for its life."""
    objects = {f"d{i % 3}/f{i:02d}.bin": payload(3_000 + i, seed=i) for i in range(24)}
    _, env = _setup(s3, objects, {k: f"art/{k}" for k in objects})
    if outcome == "failed":
        s3.faults.add(Rule("status", key="d2/f23.bin", method="GET", times=None, status=403))

    def open_under_code_dir() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
                    found.append(os.readlink(f"/proc/self/fd/{fd}"))
        return found

    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    if outcome == "failed":
        import threading

        with pytest.raises(DownloadError):
            handler.download_lazy_loading_files()
        # A failed run returns at once; its threads let go as they notice (bounded).
        deadline = time.monotonic() + 10
        while (any(t.name.startswith("lazy-loading") for t in threading.enumerate())
               and time.monotonic() < deadline):
            time.sleep(0.05)
    else:
        handler.download_lazy_loading_files()
        assert (tmp_path / "art/d1/f04.bin").read_bytes() == objects["d1/f04.bin"]
    assert open_under_code_dir() == []


@pytest.mark.parametrize("through", ["code dir", "node cache", "warm restart"])
def test_results_follow_the_configs_order_and_describe_their_own_file(
    through: str, s3: S3Store, tmp_path: Path
) -> None:
    """Files are fetched largest first, but a caller pairs results with its files by
    position: each result must name its own file, with that file's size."""
    bodies = {"small.bin": payload(1_000, seed=1), "large.bin": payload(3 * MiB, seed=2),
              "middle.bin": payload(200_000, seed=3)}
    extra = {"LAZY_LOADING_CACHE_DIR": str(tmp_path / "cache")} if through == "node cache" else {}
    _, env = _setup(s3, bodies, {key: f"artifacts/{key}" for key in bodies}, **extra)
    code = tmp_path / "code"
    if through == "warm restart":
        LazyLoadingHandler(code_dir=code, environ=env).download_lazy_loading_files()
    results = LazyLoadingHandler(code_dir=code, environ=env).download_lazy_loading_files()
    assert [(r.display, r.size) for r in results] == [
        (f"artifacts/{key}", len(body)) for key, body in bodies.items()]
    assert [r.target for r in results] == [code / "artifacts" / key for key in bodies]


def _modules_loaded_by_the_download_command(code_dir: Path, env: dict[str, str],
                                            modules: tuple[str, ...]) -> list[str]:
    """Run `drum-servers download` in a fresh interpreter, as an init container does; which of
    ``modules`` it had imported when it exited (successfully: asserted here)."""
    import subprocess
    import sys

    probe = ("import atexit, json, sys\n"
             f"watched = {modules!r}\n"
             "atexit.register(lambda: print(json.dumps([m for m in watched if m in sys.modules])))\n"
             "from drum_servers.cli import main\n"
             f"sys.exit(main(['download', '--code-dir', {str(code_dir)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded: list[str] = json.loads(result.stdout)  # nothing else on stdout
    return loaded


def test_the_download_command_imports_no_validation_library_yaml_or_boto3(
    s3: S3Store, tmp_path: Path
) -> None:
    """Every init container pays for what `drum-servers download` imports: pydantic alone was
    about 100 ms of a start, urllib3 about 30, botocore's exceptions about 5, the IDNA codec
    (and ``unicodedata``, which it loads) about 2 of a warm start's 12. A JSON config needs no
    YAML, a custom endpoint neither boto3, botocore nor urllib3 (a request that fails there
    imports botocore's errors then), an ASCII host name no IDNA, and a run without a node
    cache not its module. Nor does it need the standard library's HTTP client, its ``email``
    package (about 3 ms with ``datetime``), ``shutil`` (2 ms with ``bz2`` and ``lzma``) or
    ``random`` (a retry's jitter imports it)."""
    bucket = s3.bucket()
    s3.put(bucket, "m/w.bin", payload(70_000))
    env = lazy_env(s3.url, bucket, {"m/w.bin": "w.bin"})
    heavy = ("pydantic", "yaml", "boto3", "botocore", "s3transfer", "urllib3", "encodings.idna",
             "lazy_loading.nodecache", "http.client", "email", "datetime", "shutil", "random")
    loaded = _modules_loaded_by_the_download_command(tmp_path, env, heavy)
    assert (tmp_path / "w.bin").read_bytes() == payload(70_000)
    assert loaded == []


def test_small_files_with_a_crc32_are_verified_without_loading_awscrt(
    s3: S3Store, tmp_path: Path
) -> None:
    """awscrt (a 12 MB native library, 30-80 ms to import here) is needed only for CRC32C,
    CRC64NVME and for combining the CRCs of a file's parts. A file of one part with a CRC32,
    which boto3 uploads by default and SeaweedFS answers with, is checked with ``zlib`` as its
    body streams in: an init container must not pay for awscrt to download it."""
    bucket = s3.bucket()
    bodies = {f"m/{i}.bin": payload(50_000 + i, seed=i) for i in range(3)}
    for key, body in bodies.items():
        s3.put(bucket, key, body, ChecksumAlgorithm="CRC32")
    env = lazy_env(s3.url, bucket, {key: key for key in bodies})
    loaded = _modules_loaded_by_the_download_command(tmp_path, env, ("awscrt",))
    from lazy_loading.cache import Manifest

    for key, body in bodies.items():
        assert (tmp_path / key).read_bytes() == body
        entry = Manifest(tmp_path / ".lazy_loading").lookup(tmp_path / key)
        assert entry is not None and entry.checksum is not None
        assert entry.checksum[0] == "ChecksumCRC32", "the store's CRC32 is what was checked"
    assert loaded == []


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"])
def test_multipart_uploads_with_each_checksum_boto3_offers_download(
    algorithm: str, s3: S3Store, tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    body = payload(9 * MiB + 17, seed=21)
    source = tmp_path / "upload.bin"
    source.write_bytes(body)
    bucket = s3.bucket()
    s3.client.upload_file(str(source), bucket, "model.bin",
                          ExtraArgs={"ChecksumAlgorithm": algorithm},
                          Config=TransferConfig(multipart_threshold=8 * MiB,
                                                multipart_chunksize=8 * MiB))
    env = lazy_env(s3.url, bucket, {"model.bin": "code/model.bin"})
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "code" / "model.bin").read_bytes() == body


@pytest.mark.parametrize("proof", ["last-modified", "checksum", "nothing"])
def test_a_store_ignoring_if_match_never_yields_a_mix_of_two_versions(
    proof: str, s3: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = payload(4 * MiB, seed=31), payload(4 * MiB, seed=32)  # same size: no length check
    bucket, env = _setup(s3, {"a.bin": v1}, LAZY_LOADING_PART_SIZE="1MiB",
                         LAZY_LOADING_MAX_CONNECTIONS="1")
    time.sleep(1.1)  # Last-Modified has one-second resolution
    dropped: dict[str, str | None] = {"ETag": None}
    if proof != "last-modified":
        dropped["Last-Modified"] = None
    if proof == "nothing":  # and no checksum in the HEAD either
        s3.faults.add(Rule("headers", method="HEAD", times=None,
                           headers={"x-amz-checksum-crc32": None}))
    # Replaced while the first part is on its way, before the next one can be asked for.
    s3.faults.add(Rule("headers", key="a.bin", times=None, headers=dropped, ignore_if_match=True,
                       on_first_response=lambda: s3.put(bucket, "a.bin", v2)))
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    if proof == "checksum":
        with pytest.raises(DownloadError, match=r"ChecksumCRC32 mismatch"):
            handler.download_lazy_loading_files()
    else:
        handler.download_lazy_loading_files()
    published = tmp_path / "a.bin"
    if proof == "last-modified":
        assert published.read_bytes() == v2, "restarted on the new version"
        assert "Last-Modified changed" in caplog.text
    elif proof == "checksum":
        assert not published.exists(), "a mix is never published when a checksum can tell"
    else:
        assert "nothing proves they all come from one version" in caplog.text
    assert no_debris(tmp_path) == []


def test_a_directory_swapped_for_a_symlink_after_validation_is_never_followed(
    s3: S3Store, tmp_path: Path
) -> None:
    import threading

    from lazy_loading.cache import target_id

    code_dir, outside = tmp_path / "code", tmp_path / "outside"
    (code_dir / "artifacts").mkdir(parents=True)
    outside.mkdir()
    target = code_dir / "artifacts" / "model.bin"
    bait = outside / f".model.bin.{target_id(target)[:12]}.1-deadbeef.partial"
    bait.write_text("not ours to delete")
    _, env = _setup(s3, {"model.bin": b"weights"}, {"model.bin": "artifacts/model.bin"})
    s3.faults.add(Rule("headers", method="HEAD", times=None, seconds=1.0))

    def swap() -> None:  # while the HEADs are in flight, after the paths were validated
        (code_dir / "artifacts").rename(code_dir / "moved")
        (code_dir / "artifacts").symlink_to(outside)

    swapper = threading.Timer(0.3, swap)
    swapper.start()
    try:
        with pytest.raises(DownloadError, match=r"is a symlink or not a directory on the way"):
            LazyLoadingHandler(code_dir=code_dir, environ=env).download_lazy_loading_files()
    finally:
        swapper.join()
    assert sorted(p.name for p in outside.iterdir()) == [bait.name], "nothing written or removed"


def test_a_trickling_body_is_a_stall_and_progress_moves_meanwhile(
    s3: S3Store, tmp_path: Path
) -> None:
    import threading

    _, env = _setup(s3, {"model.bin": payload(64 * 1024, seed=3)}, LAZY_LOADING_STALL_TIMEOUT="1",
                    LAZY_LOADING_MAX_ATTEMPTS="2")
    s3.faults.add(Rule("trickle", key="model.bin", times=None, seconds=0.05))  # 20 B/s
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            handler.download_lazy_loading_files()
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run)
    started = time.monotonic()
    worker.start()
    seen = 0
    while worker.is_alive() and time.monotonic() - started < 30:
        seen = max(seen, handler.progress().bytes_done)
        time.sleep(0.1)
    worker.join(30)
    assert seen > 0, "progress moved as the bytes trickled in"
    assert failure and isinstance(failure[0], DownloadError), failure
    assert "too slow" in str(failure[0]) and "LAZY_LOADING_MIN_RATE=1024 B/s" in str(failure[0])
    assert time.monotonic() - started < 20
    assert no_debris(tmp_path) == []


def test_trickling_headers_cannot_hang_a_start_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lazy_loading import engine

    monkeypatch.setattr(engine, "AUTO_TIMEOUT_BASE", 3.0)  # 120 s by default
    with MisbehavingStore({"model.bin": b"x" * 100}, "trickle-head", seconds=0.5) as store:
        env = lazy_env(store.url, "bkt", {"model.bin": "model.bin"})
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"gave up after 3 s \(LAZY_LOADING_TIMEOUT=auto"):
            LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
        assert time.monotonic() - started < 10


def test_an_ambient_aws_endpoint_never_receives_a_repository_without_endpoint_url(
    s3: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.servers import free_port

    _, env = _setup(s3, {"a.bin": b"x"})
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    del data["repositories"][0]["endpointUrl"]  # meant for AWS S3
    # AWS S3 itself is reached through a proxy on loopback that refuses: no request leaves.
    env = {**env, "MLOPS_LAZY_LOADING_DATA": json.dumps(data), "AWS_ENDPOINT_URL": s3.url,
           "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "LAZY_LOADING_MAX_ATTEMPTS": "1"}
    with caplog.at_level(logging.WARNING, logger="lazy_loading"), pytest.raises(DownloadError):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r for r in s3.faults.ledger.requests if r[0] in ("HEAD", "GET")] == [], \
        "the ambient endpoint got the request (and the session token)"
    assert "AWS_ENDPOINT_URL is set but not used" in caplog.text


def test_running_out_of_descriptors_anyway_is_one_line_naming_the_fix(
    s3: S3Store, tmp_path: Path
) -> None:
    import resource
    import subprocess
    import sys

    bucket = s3.bucket()
    for i in range(40):
        s3.put(bucket, f"f{i}", b"x" * 1000)
    env = lazy_env(s3.url, bucket, {f"f{i}": f"art/f{i}" for i in range(40)})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = subprocess.run(
        [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (25, hard)),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Too many open files; raise the open-files limit" in last


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_a_custom_endpoint_behind_a_proxy_is_reached_through_the_proxy(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """HTTP_PROXY (or http_proxy) applies to the engine's own signed requests as to boto3's."""
    from tests.servers import free_port

    _, env = _setup(s3, {"a.bin": b"x"}, LAZY_LOADING_MAX_ATTEMPTS="1")
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, f"http://127.0.0.1:{free_port()}")  # refuses
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(DownloadError):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert [r for r in s3.faults.ledger.requests if r[0] in ("HEAD", "GET")] == [], \
        "a request went straight to the store, around the proxy"


def test_each_file_is_logged_once_and_a_long_one_also_when_it_starts(
    s3: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hundreds of small files should not mean two INFO lines each; a multi-part file says when
    it starts, since it takes a while."""
    objects = {f"small/{i}.bin": payload(1000, seed=i) for i in range(5)}
    objects["big.bin"] = payload(3 * MiB, seed=9)
    _, env = _setup(s3, objects, LAZY_LOADING_PART_SIZE="1MiB")
    with caplog.at_level(logging.INFO, logger="lazy_loading"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for i in range(5):
        about = [line for line in lines if f"small/{i}.bin" in line]
        assert len(about) == 1 and about[0].startswith("fetched "), about
    about_big = [line for line in lines if "big.bin" in line]
    assert [line.split()[0] for line in about_big] == ["fetching", "fetched"], about_big


def _nearby_store_slow_to_answer(s3: S3Store, monkeypatch: pytest.MonkeyPatch, body: bytes,
                                  checksums: str, nearby: bool = True, **env: str
                                  ) -> dict[str, str]:
    """``body`` as ``model.bin`` on a store whose first 4 GETs wait 0.3 s for their answer,
    as a server busy on our cores does; auto parts are cut as small as 1 MiB, and 4
    connections (no more) cut 32 MiB into 8 parts of 4 MiB. "Nearby" is widened to a minute
    (or the HEADs are slowed to look distant), so a slow machine's HEAD cannot decide it."""
    import lazy_loading.lookup
    import lazy_loading.plan

    monkeypatch.setattr(lazy_loading.plan, "_AUTO_MIN_PART", MiB)
    if nearby:
        monkeypatch.setattr(lazy_loading.lookup, "NEARBY_SECONDS", 60.0)
    else:
        s3.faults.add(Rule("headers", method="HEAD", times=None, seconds=0.05))
    bucket = s3.bucket()
    s3.put(bucket, "model.bin", body, **({"ChecksumAlgorithm": "CRC32"} if checksums == "true"
                                         else {}))
    s3.faults.add(Rule("headers", method="GET", key="model.bin", times=4, seconds=0.3))
    return lazy_env(s3.url, bucket, {"model.bin": "model.bin"},
                    LAZY_LOADING_MAX_CONNECTIONS="4", LAZY_LOADING_VERIFY_CHECKSUMS=checksums,
                    **env)


def _ranges_asked(s3: S3Store, key: str) -> list[tuple[int, int]]:
    asked = [r for _, k, r, _ in s3.faults.ledger.requests if k == key and r]
    return sorted((int(a), int(b)) for a, b in (r.removeprefix("bytes=").split("-")
                                               for r in asked))


@_BODY_PATHS
def test_parts_from_a_nearby_store_slow_to_answer_are_taken_several_per_get(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checksums: str,
    spliced: list[int]
) -> None:
    """The first 4 parts waited 0.3 s each for an answer, and read in far less: waiting is
    the store's work per request, so the next GET takes every part left (16 MiB, up to
    64 MiB). Each range starts and ends at a part's boundary, and no byte is asked twice."""
    body = payload(32 * MiB, seed=90)
    env = _nearby_store_slow_to_answer(s3, monkeypatch, body, checksums)
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "model.bin").read_bytes() == body
    ranges = _ranges_asked(s3, "model.bin")
    assert [(end - start + 1) // MiB for start, end in ranges] == [4, 4, 4, 4, 16], ranges
    assert [start for start, _ in ranges] == [0] + [end + 1 for _, end in ranges[:-1]]
    assert s3.faults.ledger.body_bytes["model.bin"] == len(body)
    assert _took_path(checksums, spliced)


def test_parts_from_a_distant_store_are_one_get_each_however_long_it_waits(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distant store's wait is the network's round trip, and it may cap each connection:
    its parts keep the GETs they were cut for."""
    body = payload(32 * MiB, seed=92)
    env = _nearby_store_slow_to_answer(s3, monkeypatch, body, "false", nearby=False)
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "model.bin").read_bytes() == body
    assert [(end - start + 1) // MiB for start, end in _ranges_asked(s3, "model.bin")] == [4] * 8


def test_a_part_size_set_is_every_gets_size(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = payload(32 * MiB, seed=93)
    env = _nearby_store_slow_to_answer(s3, monkeypatch, body, "false",
                                       LAZY_LOADING_PART_SIZE="4MiB")
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "model.bin").read_bytes() == body
    assert [(end - start + 1) // MiB for start, end in _ranges_asked(s3, "model.bin")] == [4] * 8


@_BODY_PATHS
def test_a_get_of_several_parts_that_stalls_is_resumed_at_the_part_it_was_in(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checksums: str,
    spliced: list[int]
) -> None:
    """The GET of the last 4 parts (above) stalls 6 MiB in, halfway through its second part
    (a stall, not a cut: a reset connection loses what the client had not read). Its first
    part is in, CRC'd and journaled: the retry asks from the second part on, so the store
    sends 2 MiB more than the file, not 6 MiB."""
    body = payload(32 * MiB, seed=91)
    env = _nearby_store_slow_to_answer(s3, monkeypatch, body, checksums,
                                       LAZY_LOADING_STALL_TIMEOUT="1")
    s3.faults.add(Rule("stall", key="model.bin", times=1, after_bytes=6 * MiB, seconds=30))
    LazyLoadingHandler(code_dir=tmp_path, environ=env).download_lazy_loading_files()
    assert (tmp_path / "model.bin").read_bytes() == body
    assert s3.faults.ledger.body_bytes["model.bin"] == len(body) + 2 * MiB
    assert (20 * MiB, 32 * MiB - 1) in _ranges_asked(s3, "model.bin")
    assert no_debris(tmp_path) == []
    assert _took_path(checksums, spliced)
