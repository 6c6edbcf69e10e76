"""DRUM's ``/stats/`` (polled by ``drum perf-test``): this process's memory and CPU, the
container's memory, and the prediction times since the last poll. Read from ``/proc`` and the
cgroup files, so no dependency is added for it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from lazy_loading.redact import redact

MB = 1024 * 1024


class PredictionTimes:
    """min/avg/max/total seconds of the calls since the last report (DRUM resets on read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: list[float] = []

    def add(self, seconds: float) -> None:
        with self._lock:
            if len(self._times) < 100_000:
                self._times.append(seconds)

    def report(self) -> dict[str, float | None]:
        with self._lock:
            times, self._times = self._times, []
        if not times:
            return {"avg": None, "max": None, "min": None, "total": None}
        return {"avg": sum(times) / len(times), "max": max(times), "min": min(times),
                "total": sum(times)}


_cpu_seen: dict[int, tuple[float, float]] = {}


def _cpu_percent(pid: int) -> float:
    """Like psutil's: the share of one CPU since the previous call, 0.0 the first time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    now = time.monotonic()
    before = _cpu_seen.get(pid)
    _cpu_seen[pid] = (now, cpu)
    if before is None or now <= before[0]:
        return 0.0
    return round(100.0 * (cpu - before[1]) / (now - before[0]), 1)


def _rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def _meminfo_mb() -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        pass
    return values


def _cgroup_mb(*names: str) -> float | None:
    for name in names:
        try:
            raw = Path("/sys/fs/cgroup", name).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            return int(raw) / MB
        if raw == "max":
            return None
    return None


def process_stats(times: PredictionTimes) -> dict[str, Any]:
    pid = os.getpid()
    try:
        cmdline = [redact(part) for part in
                   Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                   .split("\0") if part]
    except OSError:
        cmdline = []
    rss = _rss_mb(pid)
    meminfo = _meminfo_mb()
    total = meminfo.get("MemTotal", 0.0)
    limit = _cgroup_mb("memory.max", "memory/memory.limit_in_bytes") or total
    used = _cgroup_mb("memory.current", "memory/memory.usage_in_bytes") or rss
    peak = _cgroup_mb("memory.peak", "memory/memory.max_usage_in_bytes") or used
    return {
        "drum_info": [{"cmdline": cmdline, "cpu_percent": _cpu_percent(pid), "mem": rss,
                       "pid": pid}],
        "mem_info": {"avail": min(limit - used, meminfo.get("MemAvailable", total)),
                     "container_limit": limit, "container_max_used": peak,
                     "container_used": used, "drum_rss": rss,
                     "free": min(limit - used, meminfo.get("MemFree", total)), "total": total},
        "time_info": {"run_predictor_total": times.report()},
    }
