"""One timed download in a fresh process; prints JSON. Only the download call is timed here;
the caller times the whole process around it.

Usage: ``python candidate.py KIND`` with ``BENCH_SPEC`` (JSON) in the environment, plus the DRUM
lazy-loading variables for ``ours`` and ``drum``. KIND is one of ``ours``, ``drum`` (upstream
1.18.1), ``boto3`` (``download_file`` per file), ``boto3tm`` (s3transfer's TransferManager with
``max_request_concurrency=10``, what ``aws s3 cp --recursive`` does), ``crt`` (s3transfer's
CRT transfer manager), ``obstore`` (Rust ``object_store``: async ranged gets + ``pwrite``),
``floor``, ``floor16``, ``floor-safe``, ``floor-checked`` or ``floor-warm``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _prepare(kind: str, spec: dict) -> Callable[[], object]:
    files = spec["files"]  # [[key, absolute local path, size], ...]
    if kind == "ours":
        import logging

        from lazy_loading import LazyLoadingHandler

        # As the CLI logs: the suite looks for our warnings (retries) in every run.
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        return LazyLoadingHandler(code_dir=spec["code_dir"]).download_lazy_loading_files
    if kind == "drum":
        from datarobot_drum.drum.lazy_loading.lazy_loading_handler import LazyLoadingHandler

        _make_parents(files)  # upstream does not create parent directories
        return LazyLoadingHandler().download_lazy_loading_files
    if kind == "boto3":
        import boto3

        client = boto3.client("s3", endpoint_url=spec["url"], aws_access_key_id=spec["key"],
                              aws_secret_access_key=spec["secret"], region_name="us-east-1")
        _make_parents(files)

        def run() -> None:
            for key, local, _ in files:
                client.download_file(spec["bucket"], key, local)

        return run
    if kind == "boto3tm":
        from s3transfer.manager import TransferConfig, TransferManager

        client = _boto3_client(spec)
        _make_parents(files)

        def run_tm() -> None:
            with TransferManager(client, TransferConfig(max_request_concurrency=10)) as manager:
                futures = [manager.download(spec["bucket"], key, local)
                           for key, local, _ in files]
                for future in futures:
                    future.result()

        return run_tm
    if kind == "crt":
        return _crt(spec)
    if kind == "obstore":
        return _obstore(spec)
    if kind == "floor":
        return _http_floor(spec)
    if kind == "floor16":
        return _http_floor(spec, connections=16)
    if kind == "floor-safe":
        return _floor_with_guarantees(spec)
    if kind == "floor-checked":
        return _floor_with_every_check(spec)
    if kind == "floor-warm":
        return _warm_floor(spec)
    raise SystemExit(f"unknown candidate {kind}")


def _make_parents(files: list[list]) -> None:
    for _, local, _ in files:
        Path(local).parent.mkdir(parents=True, exist_ok=True)


def _boto3_client(spec: dict) -> object:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=spec["url"], aws_access_key_id=spec["key"],
                        aws_secret_access_key=spec["secret"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def _crt(spec: dict) -> Callable[[], None]:
    """boto3's ``create_transfer_manager`` ignores a custom endpoint for CRT, so the same
    parts are put together by hand: awscrt's S3 client (no TLS on loopback) and s3transfer's
    serializer pointed at the endpoint, path style."""
    import botocore.session
    from awscrt.auth import AwsCredentialsProvider
    from botocore.config import Config
    from s3transfer.crt import BotocoreCRTRequestSerializer, CRTTransferManager, create_s3_crt_client

    crt = create_s3_crt_client("us-east-1", use_ssl=False,
                               crt_credentials_provider=AwsCredentialsProvider.new_static(
                                   spec["key"], spec["secret"]))
    serializer = BotocoreCRTRequestSerializer(botocore.session.get_session(), {
        "region_name": "us-east-1", "endpoint_url": spec["url"],
        "aws_access_key_id": spec["key"], "aws_secret_access_key": spec["secret"],
        "config": Config(s3={"addressing_style": "path"})})
    files = spec["files"]
    _make_parents(files)

    def run() -> None:
        with CRTTransferManager(crt, serializer) as manager:
            futures = [manager.download(spec["bucket"], key, local) for key, local, _ in files]
            for future in futures:
                future.result()

    return run


def _obstore(spec: dict) -> Callable[[], None]:
    """16 requests in flight over all files: a HEAD, then one GET for an object up to 16 MiB
    or 16 MiB ranged GETs, each written with ``pwrite`` as it arrives."""
    import asyncio

    import obstore
    from obstore.store import S3Store

    store = S3Store(spec["bucket"], endpoint=spec["url"], access_key_id=spec["key"],
                    secret_access_key=spec["secret"], region="us-east-1",
                    virtual_hosted_style_request=False, client_options={"allow_http": True})
    part = 16 * 1024 * 1024
    files = spec["files"]
    _make_parents(files)

    async def main() -> None:
        slots = asyncio.Semaphore(16)

        async def piece(key: str, fd: int, start: int, end: int | None) -> None:
            async with slots:
                if end is None:
                    data = await (await obstore.get_async(store, key)).bytes_async()
                else:
                    data = await obstore.get_range_async(store, key, start=start, end=end)
            os.pwrite(fd, memoryview(data), start)

        async def one(key: str, local: str) -> None:
            async with slots:
                size = (await obstore.head_async(store, key))["size"]
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if size <= part:
                    await piece(key, fd, 0, None)
                else:
                    await asyncio.gather(*(piece(key, fd, s, min(s + part, size))
                                           for s in range(0, size, part)))
            finally:
                os.close(fd)

        await asyncio.gather(*(one(key, local) for key, local, _ in files))

    return lambda: asyncio.run(main())


def _run_workers(work: Any, threads: list[Any]) -> None:
    """Start the floors' worker threads, each stopped by a ``None`` after the queued work, and
    wait for them all. A worker's error ends the process with its message (a thread's
    ``SystemExit`` would otherwise vanish, leaving only a file of the wrong size)."""
    import threading

    errors: list[str] = []
    threading.excepthook = lambda args: errors.append(f"{args.exc_type.__name__}: {args.exc_value}")
    for thread in threads:
        work.put(None)
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(errors[0])


def _http_floor(spec: dict, connections: int = 4) -> Callable[[], None]:
    """The least work any HTTP client can do: 4 keep-alive connections pulling 16 MiB ranges
    with ``readinto`` into one buffer and ``pwrite``; no S3 logic, no checks, no retries.

    Not a usable downloader: it shows what this machine allows over loopback HTTP at all, so
    the engine's distance to it can be read. ``floor16`` is the same with our 16 connections,
    to tell the cost of the engine from the cost of the connection count on two cores. Against
    a store that checks signatures (``spec["signed"]``) each request is signed, as it must be.
    """
    import http.client
    import queue
    import threading
    from urllib.parse import urlsplit

    part = 16 * 1024 * 1024
    host = urlsplit(spec["url"])
    work: queue.SimpleQueue[tuple[str, int, int, int] | None] = queue.SimpleQueue()
    fds: list[int] = []
    _make_parents(spec["files"])
    sign = _sigv4(spec) if spec.get("signed") else None

    def worker() -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port)
        view = memoryview(bytearray(1024 * 1024))
        while (item := work.get()) is not None:
            path, fd, start, end = item
            headers = {"Range": f"bytes={start}-{end - 1}"}
            if sign is not None:
                headers.update(sign("GET", path))
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 206:
                raise SystemExit(f"{path}: HTTP {resp.status} {resp.read()[:300]!r}")
            while start < end:
                n = resp.readinto(view[: min(len(view), end - start)])
                os.pwrite(fd, view[:n], start)
                start += n
            resp.read()
        conn.close()

    def run() -> None:
        for key, local, size in spec["files"]:
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            for start in range(0, size, part):
                work.put((f"/{spec['bucket']}/{key}", fd, start, min(start + part, size)))
        _run_workers(work, [threading.Thread(target=worker) for _ in range(connections)])
        for fd in fds:
            os.close(fd)

    return run


def _sigv4(spec: dict) -> Callable[..., dict[str, str]]:
    """The headers that sign a bodiless request to ``path`` (already URL-safe) with SigV4, the
    day's key derived once: the least signing any S3 client does, written here so that the
    floor pays no SDK's overhead for it."""
    import hashlib
    import hmac
    from urllib.parse import urlsplit

    host = urlsplit(spec["url"]).netloc
    empty = hashlib.sha256(b"").hexdigest()
    keys: dict[str, bytes] = {}

    def sign(method: str, path: str, amz: dict[str, str] | None = None) -> dict[str, str]:
        """``amz``: more ``x-amz-*`` headers to send, signed as S3 requires of them."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = stamp[:8]
        if day not in keys:
            key = ("AWS4" + spec["secret"]).encode()
            for part in (day, "us-east-1", "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            keys[day] = key
        headers = {"host": host, **(amz or {}), "x-amz-content-sha256": empty,
                   "x-amz-date": stamp}
        names = ";".join(sorted(headers))
        canonical = (f"{method}\n{path}\n\n"
                     + "".join(f"{name}:{headers[name]}\n" for name in sorted(headers))
                     + f"\n{names}\n{empty}")
        scope = f"{day}/us-east-1/s3/aws4_request"
        to_sign = (f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n"
                   f"{hashlib.sha256(canonical.encode()).hexdigest()}")
        signature = hmac.new(keys[day], to_sign.encode(), hashlib.sha256).hexdigest()
        del headers["host"]
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={spec['key']}/{scope}, "
                                    f"SignedHeaders={names}, Signature={signature}")
        return headers

    return sign


def _lock_byte(kind: int, index: int) -> bytes:
    """A one-byte ``struct flock`` (64-bit) at ``index``, as the floors lock one byte per file
    in one shared lock file, like this package's target locks."""
    import struct

    return struct.pack("hhqqi4x", kind, os.SEEK_SET, index, 1, 0)


def _floor_with_guarantees(spec: dict, connections: int = 16) -> Callable[[], None]:
    """The raw floor for whole small files, plus the steps this package's guarantees cost per
    file and nothing else: a HEAD before the GET (a missing object fails before any body
    moves), a lock byte in one shared lock file (processes starting together fetch once), the
    body written to a temp file beside the target and renamed over it (never a partial file),
    and each request signed (SigV4, which every S3 client does, and SeaweedFS checks). No
    checks, retries, records or progress; 16 connections, as ours.

    Not a usable downloader either: it bounds what any Python downloader keeping those
    guarantees can do here, for reading the small-file rows against obstore."""
    import fcntl
    import http.client
    import queue
    import threading
    from urllib.parse import urlsplit

    host = urlsplit(spec["url"])
    sign = _sigv4(spec)
    work: queue.SimpleQueue[tuple[int, str, str] | None] = queue.SimpleQueue()
    _make_parents(spec["files"])
    lock_path = os.path.join(spec["code_dir"], ".floor.lock")

    def worker(lock_fd: int) -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port)
        while (item := work.get()) is not None:
            index, path, local = item
            conn.request("HEAD", path, headers=sign("HEAD", path))
            head = conn.getresponse()
            head.read()
            size = int(head.headers["Content-Length"])
            fcntl.fcntl(lock_fd, fcntl.F_OFD_SETLK, _lock_byte(fcntl.F_WRLCK, index))
            temp = f"{local}.{index}.partial"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            conn.request("GET", path, headers=sign("GET", path))
            body = conn.getresponse().read()
            if len(body) != size:
                raise SystemExit(f"{path}: {len(body)} bytes, HEAD said {size}")
            os.pwrite(fd, body, 0)
            os.close(fd)
            os.rename(temp, local)
            fcntl.fcntl(lock_fd, fcntl.F_OFD_SETLK, _lock_byte(fcntl.F_UNLCK, index))
        conn.close()

    def run() -> None:
        for index, (key, local, _size) in enumerate(spec["files"]):
            work.put((index, f"/{spec['bucket']}/{key}", local))
        locks = [os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644) for _ in range(connections)]
        _run_workers(work, [threading.Thread(target=worker, args=(fd,)) for fd in locks])
        for fd in locks:
            os.close(fd)

    return run


def _floor_with_every_check(spec: dict, connections: int = 16) -> Callable[[], None]:
    """``floor-safe`` with the checks and the record the same guarantees need, and nothing
    else: every HEAD answered before any GET starts (a missing object fails the run before any
    body moves), each asking for the store's checksum (signed, as S3 requires of ``x-amz-*``
    headers); under the lock, the target looked for (another process may have just fetched it);
    the directory reached from the code dir without following symlinks, and the temp file
    created and renamed in it; the GET pinned to the HEAD's ETag with ``If-Match`` and its
    status, length and ETag checked; the body's CRC32 compared with the store's when it sent
    one; the file's record (ETag, size, mtime) set on it as an extended attribute before the
    rename, so a restart can trust it. No retries, progress, logs, config or journal.

    It bounds what any Python downloader keeping every promise this package makes can do
    here, for reading the small-file rows against the best peer."""
    import base64
    import fcntl
    import http.client
    import json
    import queue
    import threading
    import zlib
    from urllib.parse import urlsplit

    host = urlsplit(spec["url"])
    sign = _sigv4(spec)
    mode = {"x-amz-checksum-mode": "ENABLED"}
    files = spec["files"]
    _make_parents(files)
    lock_path = os.path.join(spec["code_dir"], ".floor.lock")
    heads: list[tuple[int, str, str | None]] = [(0, "", None)] * len(files)
    head_work: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
    get_work: queue.SimpleQueue[tuple[int, str, str] | None] = queue.SimpleQueue()
    all_heads = threading.Barrier(connections)

    def directory(opened: dict[str, int], parent: str) -> int:
        if parent not in opened:
            fd = os.open(spec["code_dir"], os.O_RDONLY | os.O_DIRECTORY)
            for part in os.path.relpath(parent, spec["code_dir"]).split(os.sep):
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
            opened[parent] = fd
        return opened[parent]

    def worker(lock_fd: int) -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port)
        try:
            while (item := head_work.get()) is not None:
                index, path = item
                conn.request("HEAD", path, headers=sign("HEAD", path, mode))
                head = conn.getresponse()
                head.read()
                if head.status != 200:
                    raise SystemExit(f"{path}: HEAD answered {head.status}")
                heads[index] = (int(head.headers["Content-Length"]), head.headers["ETag"],
                                head.headers.get("x-amz-checksum-crc32"))
        except BaseException:
            all_heads.abort()
            raise
        try:
            all_heads.wait()
        except threading.BrokenBarrierError:  # another worker's HEAD failed: its error says why
            conn.close()
            return
        opened: dict[str, int] = {}
        while (got := get_work.get()) is not None:
            index, path, local = got
            size, etag, crc = heads[index]
            fcntl.fcntl(lock_fd, fcntl.F_OFD_SETLK, _lock_byte(fcntl.F_WRLCK, index))
            dir_fd = directory(opened, os.path.dirname(local))
            name = os.path.basename(local)
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                raise SystemExit(f"{local}: already there")
            except FileNotFoundError:
                pass
            temp = f".{name}.{index}.partial"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                         dir_fd=dir_fd)
            conn.request("GET", path, headers={"If-Match": etag, **sign("GET", path)})
            response = conn.getresponse()
            body = response.read()
            if (response.status != 200 or len(body) != size
                    or response.headers["ETag"] != etag):
                raise SystemExit(f"{path}: GET answered {response.status}, {len(body)} bytes")
            if crc is not None and zlib.crc32(body).to_bytes(4, "big") != base64.b64decode(crc):
                raise SystemExit(f"{path}: CRC32 mismatch")
            os.pwrite(fd, body, 0)
            record = {"etag": etag, "size": size, "mtime_ns": os.fstat(fd).st_mtime_ns}
            os.setxattr(fd, "user.floor.record", json.dumps(record).encode())
            os.close(fd)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            fcntl.fcntl(lock_fd, fcntl.F_OFD_SETLK, _lock_byte(fcntl.F_UNLCK, index))
        for fd in opened.values():
            os.close(fd)
        conn.close()

    def run() -> None:
        for index, (key, local, _size) in enumerate(files):
            head_work.put((index, f"/{spec['bucket']}/{key}"))
            get_work.put((index, f"/{spec['bucket']}/{key}", local))
        for _ in range(connections):
            get_work.put(None)
        locks = [os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644) for _ in range(connections)]
        _run_workers(head_work, [threading.Thread(target=worker, args=(fd,)) for fd in locks])
        for fd in locks:
            os.close(fd)

    return run


def _warm_floor(spec: dict) -> Callable[[], None]:
    """The least a warm restart can do and still ask the store whether each object changed:
    one signed HEAD per file, one after another on one keep-alive connection (the fastest way
    to a nearby store, as ours found), and each file's size on disk compared with the HEAD's.
    Less than a warm start must do: no config, no record of the ETag published, no lock.

    It bounds a warm restart here, for reading its row against the 2% target."""
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(spec["url"])
    sign = _sigv4(spec)

    def run() -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port)
        for key, local, _size in spec["files"]:
            path = f"/{spec['bucket']}/{key}"
            conn.request("HEAD", path, headers=sign("HEAD", path))
            head = conn.getresponse()
            head.read()
            if head.status != 200 or int(head.headers["Content-Length"]) != os.stat(local).st_size:
                raise SystemExit(f"{path}: changed in the store")
        conn.close()

    return run


def main() -> None:
    kind = sys.argv[1]
    spec = json.loads(os.environ["BENCH_SPEC"])
    call = _prepare(kind, spec)
    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _, local, size in spec["files"]:
        if os.path.getsize(local) != size:
            raise SystemExit(f"{local}: wrong size")
    print(json.dumps({"seconds": seconds, "idle_rss_kib": idle, "peak_rss_kib": peak}))


if __name__ == "__main__":
    main()
