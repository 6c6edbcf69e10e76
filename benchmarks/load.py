"""Load and responsiveness report: real servers from deploy/ configs, real HTTP on loopback.

1. After ready, 5,000 prediction requests at concurrency 50 against gunicorn + Flask (4 sync
   workers), gunicorn + UvicornWorker (4) and uvicorn: errors, throughput, p50/p99.
2. Background mode during a 1 GiB download (nginx store): ``/ping/`` latency p99.

Usage: ``.venv/bin/python benchmarks/load.py`` (writes ``benchmarks/LOAD.md``). Needs nginx for
part 2 (``apt-get install nginx-light``); part 1 uses the embedded S3 server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from drum_servers.demo import lazy_loading_environ, prepare_code_dir, upload_sample  # noqa: E402
from drum_servers.embedded_s3 import EmbeddedS3Server  # noqa: E402


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(kind: str, port: int) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    if kind == "gunicorn + Flask (4 sync workers)":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")], {
            "MAX_WORKERS": "4", "ADDRESS": f"127.0.0.1:{port}"}
    if kind == "gunicorn + UvicornWorker (4)":
        return [py, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn_uvicorn.conf.py")], {
            "MAX_WORKERS": "4", "ADDRESS": f"127.0.0.1:{port}"}
    return [py, "-m", "uvicorn", "--factory", "drum_servers.fastapi_app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], {}


def _start(kind: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    argv, extra = _command(kind, port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env, **extra}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def _wait(base: str, path: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}")
        try:
            if httpx.get(base + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{base}{path} not 200 after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _hammer(base: str, total: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                started = time.perf_counter()
                try:
                    r = await client.post("/predictUnstructured/", json={"x": [i % 7, 1.0, 2.0]})
                    ok = r.status_code == 200 and "prediction" in r.json()
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": total, "errors": errors, "rps": total / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


def load_part(work: Path, total: int, concurrency: int) -> list[tuple[str, dict[str, float]]]:
    rows = []
    with EmbeddedS3Server() as s3:
        upload_sample(s3.url, dim=256 * 1024)
        for kind in ("gunicorn + Flask (4 sync workers)", "gunicorn + UvicornWorker (4)",
                     "uvicorn (1 process)"):
            code = prepare_code_dir(work / f"code-{len(rows)}")
            env = {**lazy_loading_environ(s3.url), "CODE_DIR": str(code)}
            proc, base = _start(kind, env, work / f"load-{len(rows)}.log")
            try:
                _wait(base, "/health/", proc)
                result = asyncio.run(_hammer(base, total, concurrency))
            finally:
                _stop(proc)
            print(kind, result, file=sys.stderr)
            rows.append((kind, result))
    return rows


def ping_part(work: Path) -> dict[str, float] | None:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        return None
    from store import NginxStore

    root = work / "store"
    blob = root / "bench" / "one" / "model.bin"
    if not blob.exists() or blob.stat().st_size != 1 << 30:
        blob.parent.mkdir(parents=True, exist_ok=True)
        with open(blob, "wb") as fh:
            for _ in range(64):
                fh.write(os.urandom(16 << 20))
    code = work / "ping-code"
    shutil.rmtree(code, ignore_errors=True)
    code.mkdir(parents=True)
    (code / "custom.py").write_text(
        "import os\n"
        "def load_model(code_dir):\n"
        "    return os.path.getsize(os.path.join(code_dir, 'model.bin'))\n"
        "def score_unstructured(model, data, **kw):\n    return str(model)\n")
    with NginxStore(root, work / "nginx-ping") as store:
        data = {"files": [{"remotePath": "one/model.bin", "localPath": "model.bin",
                           "repositoryId": "r"}],
                "repositories": [{"repositoryId": "r", "bucketName": "bench",
                                  "credentialId": "c", "endpointUrl": store.url}]}
        env = {"MLOPS_LAZY_LOADING_DATA": json.dumps(data), "CODE_DIR": str(code),
               "MLOPS_REPOSITORY_SECRET_C": json.dumps(
                   {"credentialType": "s3", "awsAccessKeyId": "x", "awsSecretAccessKey": "y"}),
               "LAZY_LOADING_MODE": "background"}
        proc, base = _start("uvicorn (1 process)", env, work / "ping.log")
        try:
            _wait(base, "/ping/", proc)
            latencies, during = [], 0
            with httpx.Client(base_url=base, timeout=5) as client:
                while True:
                    started = time.perf_counter()
                    client.get("/ping/")
                    latencies.append(time.perf_counter() - started)
                    status = client.get("/health/").status_code
                    if status == 200:
                        break
                    during += 1
                    time.sleep(0.02)
        finally:
            _stop(proc)
    latencies.sort()
    return {"pings": len(latencies), "pings_while_downloading": during,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "max_ms": 1000 * latencies[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--out", type=Path, default=HERE / "LOAD.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        rows = load_part(Path(tmp), args.requests, args.concurrency)
    ping = ping_part(args.work)
    lines = [
        "# Load report", "",
        f"Generated by `python benchmarks/load.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, "
        f"{platform.platform()}, Python {platform.python_version()}. The load generator "
        "(httpx, asyncio) runs on the same cores as the servers.", "",
        f"## {args.requests} predictions at concurrency {args.concurrency}, after ready", "",
        "| Server | errors | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|",
    ]
    for kind, r in rows:
        lines.append(f"| {kind} | {r['errors']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} |")
    if ping:
        lines += ["", "## `/ping/` during a 1 GiB background download (uvicorn)", "",
                  f"{ping['pings']} pings ({ping['pings_while_downloading']} while "
                  f"`/health/` was 503): p50 {ping['p50_ms']:.1f} ms, **p99 "
                  f"{ping['p99_ms']:.1f} ms**, max {ping['max_ms']:.1f} ms.", ""]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
