"""One timed download in a fresh process; prints JSON. Only the download call is timed.

Usage: ``python candidate.py ours|drum|boto3|copy`` with ``BENCH_SPEC`` (JSON) in the
environment, plus the DRUM lazy-loading variables for ``ours`` and ``drum``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _prepare(kind: str, spec: dict) -> Callable[[], object]:
    files = spec["files"]  # [[key, absolute local path, size], ...]
    if kind == "ours":
        from lazy_loading import LazyLoadingHandler

        return LazyLoadingHandler(code_dir=spec["code_dir"]).download_lazy_loading_files
    if kind == "drum":
        from datarobot_drum.drum.lazy_loading.lazy_loading_handler import LazyLoadingHandler

        for _, local, _ in files:  # upstream does not create parent directories
            Path(local).parent.mkdir(parents=True, exist_ok=True)
        return LazyLoadingHandler().download_lazy_loading_files
    if kind == "boto3":
        import boto3

        client = boto3.client("s3", endpoint_url=spec["url"], aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        for _, local, _ in files:
            Path(local).parent.mkdir(parents=True, exist_ok=True)

        def run() -> None:
            for key, local, _ in files:
                client.download_file(spec["bucket"], key, local)

        return run
    if kind == "copy":
        root = Path(spec["source_root"]) / spec["bucket"]
        for _, local, _ in files:
            Path(local).parent.mkdir(parents=True, exist_ok=True)

        def copy() -> None:
            for key, local, _ in files:
                shutil.copyfile(root / key, local)

        return copy
    if kind == "floor":
        return _http_floor(spec)
    raise SystemExit(f"unknown candidate {kind}")


def _http_floor(spec: dict) -> Callable[[], None]:
    """The least work any HTTP client can do: 4 keep-alive connections pulling 16 MiB ranges
    with ``readinto`` into one buffer and ``pwrite``; no S3 logic, no checks, no retries.

    Not a usable downloader: it shows what this machine allows over loopback HTTP at all,
    so the engine's distance to it (and the floor's distance to a local copy) can be read.
    """
    import http.client
    import queue
    import threading
    from urllib.parse import urlsplit

    part = 16 * 1024 * 1024
    host = urlsplit(spec["url"])
    work: queue.SimpleQueue[tuple[str, int, int, int] | None] = queue.SimpleQueue()
    fds: list[int] = []
    for _, local, _ in spec["files"]:
        Path(local).parent.mkdir(parents=True, exist_ok=True)

    def worker() -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port)
        view = memoryview(bytearray(1024 * 1024))
        while (item := work.get()) is not None:
            path, fd, start, end = item
            conn.request("GET", path, headers={"Range": f"bytes={start}-{end - 1}"})
            resp = conn.getresponse()
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
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            work.put(None)
            thread.start()
        for thread in threads:
            thread.join()
        for fd in fds:
            os.close(fd)

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
