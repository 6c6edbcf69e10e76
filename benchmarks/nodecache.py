"""The node cache: 4 "pods" (processes with their own code dirs) on one node, with and without a
shared ``LAZY_LOADING_CACHE_DIR``, against one pod alone, in the same run.

Reports the store's body bytes (as a multiple of the data) and the time until every pod's
download is done, medians of alternating repetitions, into ``benchmarks/NODECACHE.md``::

    make bench-nodecache            # or: .venv/bin/python benchmarks/nodecache.py [--reps 5]

The byte target (1.0x the data with the cache) is exact and checked; the time ratio is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BUCKET, MiB, ensure_nginx, lazy_env, settle
from store import NginxStore

HERE = Path(__file__).resolve().parent
FILES = [(f"nodecache/part-{i:02d}.bin", 32 * MiB) for i in range(16)]
DATA = sum(size for _, size in FILES)
PODS = 4
CONFIGS = ("one pod alone", "4 pods, no cache", "4 pods, node cache",
           "4 pods, node cache already filled")


def _make_data(root: Path) -> None:
    for key, size in FILES:
        path = root / BUCKET / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            out.write(os.urandom(size))


def _run(config: str, store: NginxStore, work: Path) -> tuple[float, int]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], **lazy_env(store.url, [(k, k) for k, _ in FILES])}
    if "node cache" in config:
        env["LAZY_LOADING_CACHE_DIR"] = str(work / "node-cache")
    if config.endswith("already filled"):  # the floor: start-up, HEADs and links only
        subprocess.run([sys.executable, "-m", "drum_servers.cli", "download", "--code-dir",
                        str(work / "filler")], env=env, check=True, capture_output=True)
    pods = 1 if config == "one pod alone" else PODS
    settle()
    store.reset_log()
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "drum_servers.cli", "download",
                               "--code-dir", str(work / f"pod-{i}")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(pods)]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - started
    if any(p.returncode for p in procs):
        raise SystemExit(f"{config}: a pod failed:\n" + b"\n".join(errors).decode())
    return seconds, sum(store.body_bytes().values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "NODECACHE.md")
    args = parser.parse_args()
    ensure_nginx()
    results: dict[str, list[tuple[float, int]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-nodecache-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # nginx's workers run as another user
        _make_data(base / "data")
        with NginxStore(base / "data", base / "nginx") as store:
            for rep in range(args.reps):
                order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]
                for config in order:
                    results[config].append(_run(config, store, base / "work"))
    alone = statistics.median(s for s, _ in results["one pod alone"])
    lines = [
        "# Node cache: 4 pods on one node", "",
        f"{PODS} processes with their own code dirs start together and download 16 x 32 MiB "
        "from nginx on loopback (path-style S3 URLs); medians of "
        f"{args.reps} alternating repetitions, `sync` before each.", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Command: `make bench-nodecache`.", "",
        "| Configuration | seconds until all are done (min-max) | x one pod alone | "
        "store body bytes | x the data |",
        "|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        seconds = [s for s, _ in results[config]]
        sent = statistics.median(b for _, b in results[config])
        lines.append(f"| {config} | {statistics.median(seconds):.3f} ({min(seconds):.3f}-"
                     f"{max(seconds):.3f}) | {statistics.median(seconds) / alone:.2f} | "
                     f"{sent:,.0f} | {sent / DATA:.2f} |")
    cached = [b for _, b in results["4 pods, node cache"]]
    floor = statistics.median(s for s, _ in results["4 pods, node cache already filled"])
    cold = statistics.median(s for s, _ in results["4 pods, node cache"])
    lines += ["", "Targets: store bytes 1.0x the data with the cache (4.0x without); all ready "
              "within 1.2x of one pod alone.", "",
              f"The last row is the floor for 4 pods on this machine: {PODS} interpreters "
              f"starting, importing and HEADing at once on {os.cpu_count()} cores, with "
              f"nothing to transfer. Above that floor the shared fetch costs "
              f"{cold - floor:.3f} s, against {alone:.3f} s for one pod alone (start-up "
              "included)."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(b != DATA for b in cached):
        raise SystemExit(f"the node cache let the store send {cached} bytes, not {DATA} once")


if __name__ == "__main__":
    main()
