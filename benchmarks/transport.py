"""Native HTTP transports against ours, for what limits small files: a HEAD and a GET per file.

Issue 15 names a native transport (awscrt, or obstore's Rust client) behind the engine as a
lever. This measures it before building it: 256 × 256 KiB, each file as our single-part path
does it (a HEAD asking for the checksum, a temp file created beside the target, a GET pinned to
the HEAD's ETag, one ``pwrite``, a rename), on 16 threads, through

* ``ours``: the package's own transport (``connections.HostConnections`` and ``sigv4``);
* the whole engine: ``LazyLoadingHandler(...).download_lazy_loading_files()`` on the same files,
  i.e. that transport plus everything the guarantees add (locks, records, checks, progress,
  the HEAD stage before any GET, the throttle), for reading the rows above against;
* ``http.client alone``: one connection per thread, no timeouts, no pool, the same signer (what
  ``HostConnections`` adds to ``http.client``);
* ``awscrt.http``: one awscrt connection per thread, the same signer;
* ``obstore``: obstore's HEAD and GET (its own signer, pool and runtime);
* ``our HEAD, obstore GET``: the checksum still read by our HEAD, the body by obstore.

Reported per transport: wall time, the process's CPU and the store's (a server on the same two
cores takes what we use), each a median of alternating runs; and the import each one adds to a
process start. Usage::

    make bench-transport     # or: .venv/bin/python benchmarks/transport.py [--reps 9]

It runs in the peers' venv (``run.ensure_peers_venv``: obstore, awscrt), with this checkout
importable, and writes ``benchmarks/TRANSPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = 16
ENGINE = "the whole engine (handler call)"
ARMS = (ENGINE, "ours", "http.client alone", "awscrt.http", "obstore", "our HEAD, obstore GET")
# Whether the store's full-object checksum reaches the engine: obstore's HEAD answers only size,
# ETag, version and Last-Modified.
READS_CHECKSUM = {ENGINE: "yes", "ours": "yes", "http.client alone": "yes", "awscrt.http": "yes",
                  "obstore": "**no**", "our HEAD, obstore GET": "yes"}
IMPORTS = {"awscrt.http": "import awscrt.http, awscrt.io", "obstore": "import obstore, obstore.store"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.reps)
    else:
        _parent(args.reps)


# ------------------------------------------------------------------ the stores, in the dev venv
def _parent(reps: int) -> None:
    sys.path.insert(0, str(HERE))
    import run
    from store import NginxStore, SeaweedStore

    run.ensure_nginx()
    work = HERE / ".work"
    peers = run.ensure_peers_venv(work / "peers-venv")
    files = run.workloads(1)[run.SMALL]
    data = work / "data"
    run.make_data(data, files)
    results: dict[str, Any] = {"imports": _import_costs(peers)}
    with run.free_page_reporting_paused():
        with NginxStore(data, work / "nginx", None) as nginx:
            results["nginx"] = _measure(peers, nginx.url, "bench", "bench", nginx.proc, files,
                                        reps)
        with SeaweedStore(str(peers.parent / "weed"), work / "seaweed", "bench",
                          "bench-secret-key") as weed:
            weed.upload(data, run.BUCKET, files)
            results["SeaweedFS"] = _measure(peers, weed.url, "bench", "bench-secret-key",
                                            weed.proc, files, reps)
    out = HERE / "TRANSPORT.md"
    out.write_text(_report(results, reps, peers))
    print(out.read_text())


def _measure(peers: Path, url: str, key: str, secret: str, server: Any,
             files: list[tuple[str, int]], reps: int) -> dict[str, list[list[float]]]:
    import run  # on the path since _parent

    target = HERE / ".work" / "transport-target"
    spec = {"url": url, "bucket": run.BUCKET, "files": files, "target": str(target),
            "server_pid": server.pid}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSPORT_SPEC": json.dumps(spec),
           "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    done = subprocess.run([str(peers), __file__, "--child", "--reps", str(reps)], env=env,
                          capture_output=True, text=True, timeout=600)
    shutil.rmtree(target, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"transport bench failed on {url}:\n{done.stderr[-3000:]}")
    result: dict[str, list[list[float]]] = json.loads(done.stdout.splitlines()[-1])
    return result


def _import_costs(peers: Path, reps: int = 9) -> dict[str, float]:
    """Seconds each transport's import takes in a fresh process that has imported ours."""
    timed: dict[str, list[float]] = {name: [] for name in IMPORTS}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(reps):
        for name, statement in IMPORTS.items():
            probe = ("import time, lazy_loading.handler; t = time.perf_counter(); "
                     f"{statement}; print(time.perf_counter() - t)")
            out = subprocess.run([str(peers), "-c", probe], env=env, capture_output=True,
                                 text=True, check=True)
            timed[name].append(float(out.stdout))
    return {name: statistics.median(seconds) for name, seconds in timed.items()}


def _report(results: dict[str, Any], reps: int, peers: Path) -> str:
    lines = [
        "# Native transports for small files",
        "",
        "256 × 256 KiB on loopback, each file as our single-part path does it: a HEAD asking "
        "for the checksum, a temp file, a GET pinned to the HEAD's ETag, one `pwrite`, a "
        f"rename; {THREADS} threads; medians of {reps} alternating runs in one process (after "
        "a warm-up), process and store CPU from `getrusage` and `/proc`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Versions: {_versions(peers)}. "
        "Command: `make bench-transport`.",
        "",
        "| Store | Transport | wall s | × ours | process CPU s | store CPU s | checksum read |",
        "|---|---|---|---|---|---|---|",
    ]
    for store in ("nginx", "SeaweedFS"):
        runs = results[store]
        ours = statistics.median(r[0] for r in runs["ours"])
        for arm in ARMS:
            wall, cpu, server = (statistics.median(r[i] for r in runs[arm]) for i in range(3))
            lines.append(f"| {store} | {arm} | {wall:.3f} | {wall / ours:.2f} | {cpu:.3f} | "
                         f"{server:.3f} | {READS_CHECKSUM[arm]} |")
    imports = results["imports"]
    lines += [
        "",
        "Import added to a process that has loaded ours: "
        + ", ".join(f"{name} +{seconds * 1000:.0f} ms" for name, seconds in imports.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _versions(peers: Path) -> str:
    probe = ("from importlib.metadata import version; "
             "print(', '.join(f'{p} {version(p)}' for p in ('awscrt', 'obstore')))")
    return subprocess.run([str(peers), "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip()


# ------------------------------------------------------------------ the transports, in the peers' venv
def _child(reps: int) -> None:
    import http.client
    from urllib.parse import urlsplit

    import awscrt.http
    import awscrt.io
    import obstore
    from obstore.store import S3Store

    from lazy_loading import LazyLoadingHandler
    from lazy_loading.connections import HostConnections
    from lazy_loading.sigv4 import SigV4Signer, host_header

    spec = json.loads(os.environ["TRANSPORT_SPEC"])
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    url, bucket, target = spec["url"], spec["bucket"], Path(spec["target"])
    parts = urlsplit(url)
    host = host_header(url)
    signer = SigV4Signer(key, secret, None, "us-east-1")
    items = [(index, name, size, str(target / name)) for index, (name, size)
             in enumerate(spec["files"])]
    ours = HostConnections(parts.hostname or "", parts.port or 80, None, 10.0, 30.0, THREADS)
    loops = awscrt.io.EventLoopGroup(1)
    bootstrap = awscrt.io.ClientBootstrap(loops, awscrt.io.DefaultHostResolver(loops))
    store = S3Store(bucket, endpoint=url, access_key_id=key, secret_access_key=secret,
                    region="us-east-1", virtual_hosted_style_request=False,
                    client_options={"allow_http": True})

    def signed(method: str, name: str, extra: dict[str, str]) -> tuple[str, dict[str, str]]:
        path = f"/{bucket}/{name}"
        return path, signer.sign_path(method, host, path, extra)

    def our_head(name: str) -> tuple[int, str]:
        path, headers = signed("HEAD", name, {"x-amz-checksum-mode": "ENABLED"})
        response = ours.request("HEAD", path, headers)
        response.release_conn()
        assert response.status == 200, response.status
        return int(response.first["content-length"]), response.first["etag"]

    def our_get(name: str, etag: str) -> bytes:
        path, headers = signed("GET", name, {"If-Match": etag})
        response = ours.request("GET", path, headers)
        body = response.read()
        response.release_conn()
        assert response.status == 200, response.status
        return body

    def crt_exchange(conn: Any, method: str, name: str, extra: dict[str, str],
                     fd: int = -1) -> tuple[int, dict[str, str], int]:
        path, headers = signed(method, name, extra)
        request = awscrt.http.HttpRequest(method, path,
                                          awscrt.http.HttpHeaders(list(headers.items())))
        seen: dict[str, Any] = {"written": 0}

        def on_response(http_stream: Any, status_code: int, headers: Any, **_: Any) -> None:
            seen["status"], seen["headers"] = status_code, {k.lower(): v for k, v in headers}

        def on_body(http_stream: Any, chunk: bytes, **_: Any) -> None:
            seen["written"] += os.pwrite(fd, chunk, seen["written"])

        stream = conn.request(request, on_response, on_body if fd >= 0 else None)
        stream.activate()
        stream.completion_future.result(30)
        return seen["status"], seen["headers"], seen["written"]

    def crt_file(conn: Any, index: int, name: str, size: int, local: str) -> None:
        status, headers, _ = crt_exchange(conn, "HEAD", name, {"x-amz-checksum-mode": "ENABLED"})
        assert status == 200 and int(headers["content-length"]) == size, status
        with _temp(local, index) as fd:
            status, _, written = crt_exchange(conn, "GET", name, {"If-Match": headers["etag"]},
                                              fd)
            assert status == 200 and written == size, (status, written)

    def ours_file(_: Any, index: int, name: str, size: int, local: str) -> None:
        length, etag = our_head(name)
        with _temp(local, index) as fd:
            os.pwrite(fd, _sized(our_get(name, etag), length), 0)

    def obstore_file(_: Any, index: int, name: str, size: int, local: str) -> None:
        meta = obstore.head(store, name)
        with _temp(local, index) as fd:
            body = obstore.get(store, name, options={"if_match": meta["e_tag"]}).bytes()
            os.pwrite(fd, memoryview(_sized(body, meta["size"])), 0)

    def mixed_file(_: Any, index: int, name: str, size: int, local: str) -> None:
        length, etag = our_head(name)
        with _temp(local, index) as fd:
            body = obstore.get(store, name, options={"if_match": etag}).bytes()
            os.pwrite(fd, memoryview(_sized(body, length)), 0)

    def bare_file(conn: http.client.HTTPConnection, index: int, name: str, size: int,
                  local: str) -> None:
        path, headers = signed("HEAD", name, {"x-amz-checksum-mode": "ENABLED"})
        conn.request("HEAD", path, headers=headers)
        head = conn.getresponse()
        head.read()
        assert head.status == 200, head.status
        with _temp(local, index) as fd:
            path, headers = signed("GET", name, {"If-Match": head.headers["ETag"]})
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, response.status
            os.pwrite(fd, _sized(body, int(head.headers["Content-Length"])), 0)

    def crt_connection() -> Any:
        return awscrt.http.HttpClientConnection.new(parts.hostname, parts.port or 80,
                                                    bootstrap=bootstrap).result(10)

    def per_file(one: Callable[..., None], connect: Callable[[], Any]) -> Callable[[], None]:
        return lambda: _once(items, target, one, connect)

    def engine() -> None:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        LazyLoadingHandler(code_dir=target).download_lazy_loading_files()
        for _, _, size, local in items:
            assert os.path.getsize(local) == size, local

    sys.path.insert(0, str(HERE))
    import run

    os.environ.update(run.lazy_env(url, [(name, local) for _, name, _, local in items], None,
                                   key, secret), LAZY_LOADING_PROGRESS_INTERVAL="3600")
    arms: dict[str, Callable[[], None]] = {
        ENGINE: engine,
        "ours": per_file(ours_file, lambda: None),
        "http.client alone": per_file(bare_file, lambda: http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80)),
        "awscrt.http": per_file(crt_file, crt_connection),
        "obstore": per_file(obstore_file, lambda: None),
        "our HEAD, obstore GET": per_file(mixed_file, lambda: None),
    }
    server = int(spec["server_pid"])
    for _ in range(30):  # SeaweedFS answers 500 for a moment after an upload
        try:
            arms["ours"]()
            break
        except AssertionError:
            time.sleep(1)
    runs: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
    for rep in range(reps):
        for arm in (ARMS if rep % 2 == 0 else ARMS[::-1]):
            server_before, used_before = _tree_cpu(server), _own_cpu()
            started = time.perf_counter()
            arms[arm]()
            wall = time.perf_counter() - started
            runs[arm].append([wall, _own_cpu() - used_before, _tree_cpu(server) - server_before])
    ours.close()
    print(json.dumps(runs))


def _once(items: list[tuple[int, str, int, str]], target: Path,
          one: Callable[..., None], connect: Callable[[], Any]) -> None:
    """Every file once, on ``THREADS`` threads; every file checked for its size after."""
    shutil.rmtree(target, ignore_errors=True)
    for _, _, _, local in items:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    work: queue.SimpleQueue[tuple[int, str, int, str]] = queue.SimpleQueue()
    for item in items:
        work.put(item)
    errors: list[BaseException] = []

    def thread() -> None:
        try:
            conn = connect()
            while True:
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                one(conn, *item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for _, _, size, local in items:
        assert os.path.getsize(local) == size, local


class _temp:
    """A temp file beside ``local`` (``O_EXCL``), renamed onto it when the block succeeds."""

    def __init__(self, local: str, index: int) -> None:
        self._local, self._temp = local, f"{local}.{index}.partial"

    def __enter__(self) -> int:
        self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o644)
        return self._fd

    def __exit__(self, kind: object, *_: object) -> None:
        os.close(self._fd)
        if kind is None:
            os.rename(self._temp, self._local)
        else:
            os.unlink(self._temp)


def _sized(body: Any, size: int) -> Any:
    assert len(body) == size, (len(body), size)
    return body


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (nginx's workers), from ``/proc``."""
    total, pids = 0, [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{current}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
