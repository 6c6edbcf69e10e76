"""Optional Prometheus metrics (``pip install 'drum-lazy-loading[metrics]'``), served on
``/metrics``. Under gunicorn set ``PROMETHEUS_MULTIPROC_DIR`` to an empty writable directory so
every worker's samples are aggregated; without it each worker reports only its own."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

from lazy_loading import FileResult, ProgressSnapshot

try:
    import prometheus_client as _prom
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    _prom = None  # type: ignore[assignment]

_metrics: dict[str, Any] = {}


def enabled() -> bool:
    return _prom is not None and os.environ.get("DRUM_METRICS", "true").lower() != "false"


def _get() -> dict[str, Any]:
    if not _metrics and enabled():
        assert _prom is not None
        mode: Literal["livemax", "all"] = "livemax" if _multiprocess() else "all"
        _metrics.update(
            bytes=_prom.Counter("lazy_loading_body_bytes", "Artifact body bytes fetched from S3"),
            files=_prom.Counter("lazy_loading_files", "Artifacts made present, by how",
                                ["status"]),
            retries=_prom.Counter("lazy_loading_retries", "Retried S3 requests"),
            seconds=_prom.Gauge("lazy_loading_download_seconds",
                                "Duration of the last successful download",
                                multiprocess_mode=mode),
            ready=_prom.Gauge("drum_servers_ready", "1 once the model is loaded",
                              multiprocess_mode=mode),
            requests=_prom.Counter("drum_servers_requests", "HTTP requests",
                                   ["route", "status"]),
            latency=_prom.Histogram("drum_servers_request_seconds", "HTTP request latency",
                                    ["route"]),
        )
    return _metrics


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def record_download(results: Sequence[FileResult], progress: ProgressSnapshot) -> None:
    m = _get()
    if not m:
        return
    for result in results:
        m["files"].labels(result.status).inc()
        m["bytes"].inc(result.bytes_fetched)
    m["retries"].inc(progress.retries)
    m["seconds"].set(progress.elapsed)


def set_ready(ready: bool) -> None:
    m = _get()
    if m:
        m["ready"].set(1 if ready else 0)


def record_request(route: str, status: int, seconds: float) -> None:
    m = _get()
    if m:
        m["requests"].labels(route, str(status)).inc()
        m["latency"].labels(route).observe(seconds)


def render() -> tuple[bytes, str] | None:
    """The exposition text, aggregated across processes in multiprocess mode."""
    if not _get():
        return None
    assert _prom is not None
    if _multiprocess():
        from prometheus_client import multiprocess

        registry = _prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return _prom.generate_latest(registry), _prom.CONTENT_TYPE_LATEST
    return _prom.generate_latest(), _prom.CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """gunicorn ``child_exit``: drop a dead worker's live gauges."""
    if _prom is not None and _multiprocess():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
