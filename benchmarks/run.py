"""Benchmark suite: this package vs upstream DRUM 1.18.1, plain boto3, and a local copy.

One invocation runs every scenario, alternating candidates each repetition to cancel drift, and
writes medians, min-max and ratios to ``benchmarks/RESULTS.md``. Usage::

    make bench                      # or: .venv/bin/python benchmarks/run.py [--reps 3] [--quick]

Needs nginx (``apt-get install nginx-light``; installed automatically when run as root) and a
separate venv with ``datarobot-drum==1.18.1 datarobot-storage==2.2.0`` (created on first run).
Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import NginxStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1024 * 1024
BUCKET = "bench"


@dataclass
class Scenario:
    name: str
    files: list[tuple[str, int]]  # (key, size)
    rate: str | None
    candidates: list[str]
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def _sh(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def ensure_nginx() -> None:
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        return
    if os.geteuid() != 0:
        raise SystemExit("nginx is needed: apt-get install nginx-light")
    _sh("apt-get", "update", "-qq")
    _sh("apt-get", "install", "-y", "-qq", "nginx-light")


def ensure_drum_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    probe = "import datarobot_drum.drum.lazy_loading.lazy_loading_handler"
    if python.exists() and subprocess.run([python, "-c", probe]).returncode == 0:
        return python
    print("creating the upstream DRUM venv (datarobot-drum==1.18.1) …", file=sys.stderr)
    _sh(sys.executable, "-m", "venv", str(path))
    _sh(str(python), "-m", "pip", "install", "-q", "datarobot-drum==1.18.1",
        "datarobot-storage==2.2.0")
    return python


def make_data(root: Path, scenarios: list[Scenario]) -> None:
    for sc in scenarios:
        for key, size in sc.files:
            path = root / BUCKET / key
            if path.exists() and path.stat().st_size == size:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                left = size
                while left:
                    chunk = min(left, 16 * MiB)
                    fh.write(os.urandom(chunk))
                    left -= chunk


def sha256_of(path: Path) -> str:
    """The file's SHA-256, cached beside it (computed once per data set)."""
    import hashlib

    cache = path.with_name(path.name + ".sha256")
    if cache.exists() and cache.stat().st_mtime >= path.stat().st_mtime:
        return cache.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * MiB):
            digest.update(chunk)
    cache.write_text(digest.hexdigest())
    return digest.hexdigest()


def lazy_env(url: str, files: list[tuple[str, str]],
             sha256: dict[str, str] | None = None) -> dict[str, str]:
    data = {
        "files": [{"remotePath": k, "localPath": local, "repositoryId": "r",
                   **({"sha256": sha256[k]} if sha256 else {})} for k, local in files],
        "repositories": [{"repositoryId": "r", "bucketName": BUCKET, "credentialId": "c",
                          "endpointUrl": url}],
    }
    secret = {"credentialType": "s3", "awsAccessKeyId": "bench", "awsSecretAccessKey": "bench"}
    return {"MLOPS_LAZY_LOADING_DATA": json.dumps(data),
            "MLOPS_REPOSITORY_SECRET_C": json.dumps(secret)}


def run_candidate(kind: str, python: Path, sc: Scenario, store: NginxStore, target: Path,
                  data_root: Path, clean: bool = True, verify: bool = False) -> dict[str, float]:
    if clean and target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    files = [(key, str(target / "artifacts" / key)) for key, _ in sc.files]
    spec = {"files": [[k, local, size] for (k, local), (_, size) in zip(files, sc.files, strict=True)],
            "bucket": BUCKET, "url": store.url, "code_dir": str(target),
            "source_root": str(data_root)}
    sha256 = ({k: sha256_of(data_root / BUCKET / k) for k, _ in sc.files} if verify else None)
    env = {**os.environ, **lazy_env(store.url, files, sha256), "BENCH_SPEC": json.dumps(spec),
           "LAZY_LOADING_PROGRESS_INTERVAL": "3600"}
    settle()
    store.reset_log()
    out = subprocess.run([str(python), str(HERE / "candidate.py"), kind], env=env, text=True,
                         capture_output=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed in {sc.name}:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["body_bytes"] = sum(store.body_bytes().values())
    return result


_PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")


@contextlib.contextmanager
def free_page_reporting_paused() -> Iterator[str]:
    """Stop the guest kernel from handing freed memory back to the hypervisor while we measure.

    With virtio-balloon free page reporting, pages freed by deleting the previous run's 1 GiB
    are returned to the host; whichever run reuses them pays a host fault per page (about 1.3 s
    of extra CPU per GiB on our 2-core VM), so runs alternate between fast and slow regardless of
    the candidate. Raising the reporting order above the largest buddy block stops reporting;
    the old value is restored afterwards. Yields what was done, for RESULTS.md.
    """
    try:
        old = _PAGE_REPORTING.read_text().strip()
    except OSError:
        yield "no free page reporting on this machine"
        return
    try:
        _PAGE_REPORTING.write_text("11")
    except OSError:
        yield (f"free page reporting is on (order {old}) and could not be paused (needs root): "
               "expect runs to alternate between fast and slow")
        return
    try:
        yield f"free page reporting paused during the runs (order {old} -> 11, restored after)"
    finally:
        _PAGE_REPORTING.write_text(old)


def settle() -> None:
    """Flush the previous run's dirty pages so no candidate pays for another's write-back."""
    os.sync()
    time.sleep(float(os.environ.get("BENCH_SETTLE", "0.5")))


def rotate(items: list[str], by: int) -> Iterator[str]:
    by %= len(items)
    yield from items[by:] + items[:by]


def gunicorn_scenario(sc: Scenario, store: NginxStore, work: Path) -> dict[str, float]:
    """4 gunicorn workers starting together vs one process downloading the same files."""
    code = work / "gunicorn-code"
    if code.exists():
        shutil.rmtree(code)
    code.mkdir(parents=True)
    (code / "custom.py").write_text(
        "def load_model(code_dir):\n    return None\n"
        "def score_unstructured(model, data, **kw):\n    return 'ok'\n")
    files = [(key, str(code / "artifacts" / key)) for key, _ in sc.files]
    env = {**os.environ, **lazy_env(store.url, files), "CODE_DIR": str(code),
           "LAZY_LOADING_PROGRESS_INTERVAL": "3600"}
    # One process, cold.
    settle()
    store.reset_log()
    started = time.perf_counter()
    _sh(sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(code), env=env)
    single = time.perf_counter() - started
    shutil.rmtree(code / "artifacts")
    shutil.rmtree(code / ".lazy_loading")
    # Four workers, cold.
    settle()
    store.reset_log()
    log = work / "gunicorn.log"
    from store import _free_port

    port = _free_port()
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py")],
            env={**env, "MAX_WORKERS": "4", "ADDRESS": f"127.0.0.1:{port}"},
            stdout=fh, stderr=subprocess.STDOUT)
    try:
        while log.read_text().count("model ready in") < 4:
            if proc.poll() is not None:
                raise SystemExit(f"gunicorn exited:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
        all_ready = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
    total = sum(size for _, size in sc.files)
    return {"single_seconds": single, "all_ready_seconds": all_ready,
            "body_bytes": sum(store.body_bytes().values()), "data_bytes": total}


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--tmpfs", default="/dev/shm" if Path("/dev/shm").is_dir() else "",
                        help="also run the uncapped scenarios with targets on this tmpfs, "
                             "to separate the engine from disk write-back ('' to skip)")
    args = parser.parse_args()

    ensure_nginx()
    drum_python = ensure_drum_venv(args.work / "drum-venv")
    ours_python = Path(sys.executable)
    scale = 16 if args.quick else 1
    big = [("one/model.bin", 1024 * MiB // scale)]
    mid = [(f"sixteen/shard-{i:02d}.bin", 32 * MiB // scale) for i in range(16)]
    small = [(f"many/f-{i:03d}.bin", 256 * 1024 // scale) for i in range(256)]
    all5 = ["ours", "drum", "boto3", "floor", "copy"]

    def scenarios() -> list[Scenario]:
        return [
            Scenario("1 × 1 GiB, uncapped", big, None, all5),
            Scenario("16 × 32 MiB, uncapped", mid, None, all5),
            Scenario("256 × 256 KiB, uncapped", small, None, ["ours", "drum", "boto3"]),
            Scenario("1 × 1 GiB, 40 MB/s per connection", big, "40m",
                     ["ours", "drum", "boto3"]),
        ]

    with free_page_reporting_paused() as memory_note:
        data_root = args.work / "store"
        make_data(data_root, scenarios())
        pythons = {"ours": ours_python, "drum": drum_python, "boto3": ours_python,
                   "floor": ours_python, "copy": ours_python}
        target = args.work / "target"
        tables: list[tuple[str, list[Scenario]]] = []
        for label, directory in [("disk", target), *(
                [("tmpfs", Path(args.tmpfs) / "drum-bench-target")] if args.tmpfs else [])]:
            table = scenarios() if label == "disk" else scenarios()[:3]
            for sc in table:
                with NginxStore(data_root, args.work / "nginx", sc.rate) as store:
                    for rep in range(args.reps):
                        for kind in rotate(sc.candidates, rep):
                            res = run_candidate(kind, pythons[kind], sc, store, directory,
                                                data_root)
                            sc.results.setdefault(kind, []).append(res)
                            print(f"{label}: {sc.name} [{rep}] {kind}: {res['seconds']:.3f} s",
                                  file=sys.stderr)
            shutil.rmtree(directory, ignore_errors=True)
            tables.append((label, table))

        # Warm restart: cold once, then restarts with every file present and unchanged.
        warm_sc = Scenario("warm restart, 16 × 32 MiB", mid, None, ["ours"])
        with NginxStore(data_root, args.work / "nginx", None) as store:
            cold = [run_candidate("ours", ours_python, warm_sc, store, target, data_root)
                    for _ in range(args.reps)]
            warm = [run_candidate("ours", ours_python, warm_sc, store, target, data_root,
                                  clean=False) for _ in range(args.reps)]
            gunicorn = [gunicorn_scenario(warm_sc, store, args.work) for _ in range(args.reps)]

        # What verification costs: the same 1 GiB with and without a sha256 to check, from the
        # uncapped store (CPU-bound) and the capped one (network-bound, where hashing overlaps).
        verify_dir = Path(args.tmpfs) / "drum-bench-verify" if args.tmpfs else target
        big_sc = Scenario("1 × 1 GiB", big, None, ["ours"])
        verification: dict[str, list[dict[str, float]]] = {}
        for rate in (None, "40m"):
            with NginxStore(data_root, args.work / "nginx", rate) as store:
                for _ in range(args.reps):
                    for mode in ("plain", "sha256"):
                        verification.setdefault(f"{mode} {rate}", []).append(run_candidate(
                            "ours", ours_python, big_sc, store, verify_dir, data_root,
                            verify=mode == "sha256"))
        shutil.rmtree(verify_dir, ignore_errors=True)

    write_results(args, tables, cold, warm, gunicorn, drum_python, verification, memory_note)


def _median(runs: list[dict[str, float]], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in runs)


def _table(scenarios: list[Scenario]) -> list[str]:
    lines = [
        "| Scenario | this package | upstream DRUM | boto3 download_file | raw HTTP floor | "
        "local copy | ours / upstream | ours / copy | floor / copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in scenarios:
        cells = [fmt([r["seconds"] for r in sc.results[k]]) if k in sc.results else "–"
                 for k in ("ours", "drum", "boto3", "floor", "copy")]
        ours = _median(sc.results["ours"])
        vs_drum = f"**{ours / _median(sc.results['drum']):.2f}**"
        vs_copy = floor_copy = "–"
        if "copy" in sc.results:
            copy = _median(sc.results["copy"])
            vs_copy = f"**{ours / copy:.2f}**"
            floor_copy = f"{_median(sc.results['floor']) / copy:.2f}"
        lines.append(f"| {sc.name} | {' | '.join(cells)} | {vs_drum} | {vs_copy} | {floor_copy} |")
    return lines


def write_results(args: argparse.Namespace, tables: list[tuple[str, list[Scenario]]],
                  cold: list[dict[str, float]], warm: list[dict[str, float]],
                  gunicorn: list[dict[str, float]], drum_python: Path,
                  verification: dict[str, list[dict[str, float]]], memory_note: str) -> None:
    from importlib.metadata import version

    drum_version = _sh(str(drum_python), "-c",
                       "import importlib.metadata as m; print(m.version('datarobot-drum'), "
                       "m.version('datarobot-storage'), m.version('boto3'))").stdout.strip()
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{' '.join(['python', 'benchmarks/run.py', *sys.argv[1:]])}` "
        f"(`make bench`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "See [README.md](README.md) for how to read these numbers.",
        "",
        f"- Machine: {os.cpu_count()} cores, {platform.machine()}, {platform.platform()}",
        f"- Python {platform.python_version()}; this package with boto3 {version('boto3')}; "
        f"upstream datarobot-drum / datarobot-storage / boto3: {drum_version}",
        f"- Store: nginx {_nginx_version()} on 127.0.0.1 serving path-style S3 URLs; "
        "capped runs use `limit_rate 40m` per connection",
        f"- {args.reps} runs per candidate, alternating order; seconds are median (min–max) of "
        "the download call only, in a fresh process, target directory emptied and `sync` run "
        "before each run",
        f"- Memory: {memory_note}",
    ]
    for label, scenarios in tables:
        where = ("targets on the VM's disk (ext4)" if label == "disk"
                 else "targets on tmpfs: the same runs without disk write-back")
        lines += ["", f"## {where}", "", *_table(scenarios)]
    big = tables[0][1][0].results["ours"]
    rss = statistics.median((r["peak_rss_kib"] - r["idle_rss_kib"]) / 1024 for r in big)
    warm_ratio = _median(warm) / _median(cold)
    warm_bytes = max(r["body_bytes"] for r in warm)
    g_bytes = max(r["body_bytes"] / r["data_bytes"] for r in gunicorn)
    g_ratio = statistics.median(r["all_ready_seconds"] / r["single_seconds"] for r in gunicorn)
    lines += [
        "",
        "## Other targets",
        "",
        "| Target | measured |",
        "|---|---|",
        f"| warm restart of 16 × 32 MiB vs a cold run | {_median(warm):.3f} s vs "
        f"{_median(cold):.3f} s = **{warm_ratio:.3f}**, body bytes {warm_bytes} |",
        f"| 4 gunicorn workers starting together on 16 × 32 MiB | body bytes "
        f"**{g_bytes:.3f} ×** the data; all ready in "
        f"{statistics.median(r['all_ready_seconds'] for r in gunicorn):.2f} s vs "
        f"{statistics.median(r['single_seconds'] for r in gunicorn):.2f} s for one "
        f"`drum-servers download` process = **{g_ratio:.2f}** |",
        f"| peak RSS above idle during 1 × 1 GiB | **{rss:.0f} MiB** |",
        *(f"| verification cost, 1 × 1 GiB with a config `sha256`, {label} "
          f"({'tmpfs' if args.tmpfs else 'disk'}) | {_median(verification[f'sha256 {rate}']):.3f} s "
          f"vs {_median(verification[f'plain {rate}']):.3f} s without = **"
          f"{_median(verification[f'sha256 {rate}']) / _median(verification[f'plain {rate}']):.2f}"
          "×** |" for rate, label in ((None, "uncapped"), ("40m", "40 MB/s per connection"))),
        "",
        "S3 CRC checksums of multi-part files are combined from part CRCs (no read back); a "
        "`sha256` is computed part by part in order while the parts are in the page cache, which "
        "overlaps the download when the network, not the CPU, is the limit.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def _nginx_version() -> str:
    out = subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-v"], text=True,
                         capture_output=True)
    return out.stderr.strip().split("/")[-1]


if __name__ == "__main__":
    main()
