"""Real servers from ``deploy/`` configs, real HTTP, a real S3 server on loopback."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from drum_servers.demo import prepare_code_dir, sample_model, upload_sample
from tests.conftest import SECRET_CANARY, TOKEN_CANARY, S3Store, lazy_env
from tests.faults import Rule
from tests.servers import WORKERS, RunningServer, free_port, start_server

DIM = 256 * 1024  # 2 MiB of weights: several ranged parts at 1 MiB
FILES = {"sample/model.json": "artifacts/model.json", "sample/weights.bin": "artifacts/weights.bin"}
KINDS = list(WORKERS)


def _expected(x: list[float]) -> float:
    objects = sample_model(DIM)
    weights = struct.unpack(f"<{DIM}d", objects["sample/weights.bin"])
    return sum(a * b for a, b in zip(x, weights, strict=False)) + 0.5


@pytest.fixture
def model_env(s3: S3Store, tmp_path: Path) -> tuple[Path, dict[str, str], str]:
    bucket = s3.bucket()
    s3.client.delete_bucket(Bucket=bucket)
    upload_sample(s3.url, bucket, DIM)
    code_dir = prepare_code_dir(tmp_path / "code")
    env = lazy_env(s3.url, bucket, FILES, LAZY_LOADING_PART_SIZE="1MiB")
    return code_dir, env, bucket


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    running: list[RunningServer] = []
    yield running
    for server in running:
        server.stop()


ServerStarter = Callable[..., RunningServer]


@pytest.fixture
def serve(model_env: tuple[Path, dict[str, str], str], servers: list[RunningServer],
          tmp_path: Path) -> ServerStarter:
    """Start ``kind`` on the sample model (``env`` overrides added); stopped after the test."""
    code_dir, base_env, _ = model_env

    def start(kind: str, log_name: str = "server.log", **env: str) -> RunningServer:
        server = start_server(kind, code_dir, {**base_env, **env}, tmp_path / log_name)
        servers.append(server)
        return server

    return start


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET_CANARY not in text and TOKEN_CANARY not in text


@pytest.mark.parametrize("kind", KINDS)
def test_server_loads_after_download_and_serves_predictions(
    kind: str, s3: S3Store, model_env: tuple[Path, dict[str, str], str],
    servers: list[RunningServer], tmp_path: Path,
) -> None:
    code_dir, env, _ = model_env
    server = start_server(kind, code_dir, {**env, "INFO_DETAILS": "true"},
                          tmp_path / "server.log")
    servers.append(server)
    server.wait_ready()

    assert server.get("/ping/").json() == {"message": "OK"}
    assert server.get("/ping").status_code == 200
    assert server.get("/").json() == {"message": "OK"}
    pids = set()
    for i in range(40):
        x = [float(i), 1.0, -2.0, 0.25 * i]
        resp = server.post("/predictUnstructured/", json={"x": x})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        body = resp.json()
        assert body["prediction"] == pytest.approx(_expected(x))
        pids.add(body["pid"])
    assert server.post("/predictionsUnstructured", json={"x": [1.0]}).status_code == 200

    weights = len(sample_model(DIM)["sample/weights.bin"])
    assert s3.faults.ledger.body_bytes["sample/weights.bin"] == weights, \
        "the weights are fetched once in total, not once per worker"
    heads = [k for m, k, _, _ in s3.faults.ledger.requests if m == "HEAD"]
    assert sorted(heads) == sorted(FILES), "workers reuse the master's verified download"
    time.sleep(0.5)
    log = server.log()
    assert log.count("model ready in") == WORKERS[kind], log
    info = server.get("/info/").json()
    assert {a["path"] for a in info["drumServers"]["artifacts"]} == set(FILES.values())
    _no_secret(log, json.dumps(info), server.get("/health/").text)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_object_stops_the_server_non_zero(
    kind: str, s3: S3Store, model_env: tuple[Path, dict[str, str], str],
    servers: list[RunningServer], tmp_path: Path,
) -> None:
    code_dir, env, bucket = model_env
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    data["files"].append({"remotePath": "sample/missing.bin", "localPath": "artifacts/m.bin",
                          "repositoryId": "repo-1"})
    env["MLOPS_LAZY_LOADING_DATA"] = json.dumps(data)
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    code = server.wait_exit(60)
    log = server.log()
    assert code != 0, log
    assert f"s3://{bucket}/sample/missing.bin" in log
    assert "model ready" not in log
    _no_secret(log)


@pytest.mark.parametrize("kind", ["gunicorn-flask", "gunicorn-flask-gevent", "uvicorn-fastapi",
                                  "gunicorn-fastapi"])
def test_background_mode_answers_ping_while_downloading(
    kind: str, s3: S3Store, model_env: tuple[Path, dict[str, str], str],
    servers: list[RunningServer], tmp_path: Path,
) -> None:
    code_dir, env, _ = model_env
    env["LAZY_LOADING_MODE"] = "background"
    s3.faults.add(Rule("throttle", key="sample/weights.bin", times=None, rate=256 * 1024))
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    deadline = time.monotonic() + 30
    while True:
        try:
            ping = server.get("/ping/", timeout=1.0)
            break
        except Exception:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    assert ping.status_code == 200
    health = server.get("/health/")
    assert health.status_code == 503
    assert health.json()["status"] in ("starting", "downloading", "loading")
    assert "progress" in health.json()
    early = server.post("/predictUnstructured/", json={"x": [1.0]})
    assert early.status_code == 503
    assert early.headers["retry-after"]
    # A loop blocked by the download would hold /ping/ for the whole transfer (8 s here).
    for _ in range(5):
        started = time.monotonic()
        assert server.get("/ping/").status_code == 200
        assert time.monotonic() - started < 2.0
    server.wait_ready(60)
    assert server.post("/predictUnstructured/", json={"x": [1.0]}).status_code == 200


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_background_failure_reports_then_exits_non_zero(
    kind: str, s3: S3Store, model_env: tuple[Path, dict[str, str], str],
    servers: list[RunningServer], tmp_path: Path,
) -> None:
    code_dir, env, _ = model_env
    env["LAZY_LOADING_MODE"] = "background"
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    data["files"][0]["remotePath"] = "sample/missing.json"
    env["MLOPS_LAZY_LOADING_DATA"] = json.dumps(data)
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    saw_error = False
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            resp = server.get("/health/", timeout=1.0)
            if resp.status_code == 503 and resp.json().get("error"):
                assert "sample/missing.json" in resp.json()["error"]
                _no_secret(resp.text)
                saw_error = True
        except Exception:
            pass
        time.sleep(0.1)
    assert saw_error, server.log()
    assert server.wait_exit(30) != 0
    assert "sample/missing.json" in server.log()


@pytest.mark.parametrize("kind", ["gunicorn-flask", "gunicorn-fastapi", "uvicorn-fastapi"])
def test_load_model_error_shows_the_users_traceback_and_fails(
    kind: str, model_env: tuple[Path, dict[str, str], str], servers: list[RunningServer],
    tmp_path: Path,
) -> None:
    code_dir, env, _ = model_env
    custom = code_dir / "custom.py"
    custom.write_text(custom.read_text().replace(
        "    artifacts = Path(code_dir)", "    _users_helper()\n    artifacts = Path(code_dir)"
    ) + "\n\ndef _users_helper():\n    raise RuntimeError('weights are corrupt')\n")
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    code = server.wait_exit(60)
    log = server.log()
    assert code != 0, log
    assert "Traceback" in log and "_users_helper" in log and "weights are corrupt" in log


def test_json_logs_and_metrics_aggregated_across_gunicorn_workers(
    s3: S3Store, model_env: tuple[Path, dict[str, str], str], servers: list[RunningServer],
    tmp_path: Path,
) -> None:
    code_dir, env, _ = model_env
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env.update(LOG_FORMAT="json", PROMETHEUS_MULTIPROC_DIR=str(prom_dir))
    server = start_server("gunicorn-flask", code_dir, env, tmp_path / "server.log")
    servers.append(server)
    server.wait_ready()
    for i in range(30):
        assert server.post("/predictUnstructured/", json={"x": [float(i)]},
                           headers={"X-Request-ID": f"req-{i}"}).status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(server.get("/metrics").text)
        for s in family.samples
    }
    assert samples[("drum_servers_requests_total",
                    (("route", "predict"), ("status", "200")))] == 30
    artifacts = sum(len(body) for body in sample_model(DIM).values())
    assert samples[("lazy_loading_body_bytes_total", ())] == artifacts
    assert samples[("lazy_loading_files_total", (("status", "fetched"),))] == 2
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    ours = [r for r in records if r.get("logger") in ("drum_servers", "lazy_loading")]
    assert sum("model ready" in r["message"] for r in ours) == 3
    assert all({"time", "level", "process", "message"} <= set(r) for r in ours)
    access = [r["message"] for r in records if r.get("logger") == "gunicorn.access"]
    assert any("request_id=req-7" in m for m in access)


@pytest.mark.parametrize("kind", ["uvicorn-fastapi", "gunicorn-flask"])
def test_openapi_docs_work_and_query_strings_cannot_grow_the_metrics(
    kind: str, serve: ServerStarter, tmp_path: Path
) -> None:
    env = {}
    if kind.startswith("gunicorn"):
        # Each request is a new connection, which any of the 3 workers may take: the metrics
        # are read as the README says to run them under gunicorn, aggregated over the workers,
        # or /metrics from a worker that served no /ping/ shows none.
        prom_dir = tmp_path / "prom"
        prom_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    server = serve(kind, **env)
    server.wait_ready()
    if kind == "uvicorn-fastapi":
        schema = server.get("/openapi.json")
        assert schema.status_code == 200, schema.text
        assert "/ping/" in schema.json()["paths"]
        assert schema.json()["paths"]["/ping/"]["get"].get("parameters", []) == []
        assert server.get("/docs").status_code == 200
    for i in range(20):
        assert server.get(f"/ping/?path=/x{i}&view=v{i}").status_code == 200
    routes = {line.split('route="')[1].split('"')[0]
              for line in server.get("/metrics").text.splitlines()
              if line.startswith("drum_servers_requests_total{")}
    assert routes <= {"/", "/ping/", "/health/", "/info/", "/metrics", "predict", "other"}, routes
    assert "/ping/" in routes


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_missing_custom_py_fails_before_any_transfer(
    kind: str, s3: S3Store, model_env: tuple[Path, dict[str, str], str],
    servers: list[RunningServer], tmp_path: Path,
) -> None:
    code_dir, env, _ = model_env
    (code_dir / "custom.py").unlink()
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    code = server.wait_exit(60)
    log = server.log()
    assert code != 0, log
    assert f"{code_dir / 'custom.py'} not found" in log
    assert [r for r in s3.faults.ledger.requests if r[0] in ("HEAD", "GET")] == [], \
        "nothing is requested from the store"
    assert not (code_dir / "artifacts").exists()


NO_ARTIFACT_MODEL = '''
def load_model(code_dir):
    return "no artifacts needed"

def score_unstructured(model, data, **kwargs):
    return model
'''


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_misspelled_variables_are_named_and_a_model_without_artifacts_serves(
    kind: str, servers: list[RunningServer], tmp_path: Path,
) -> None:
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "custom.py").write_text(NO_ARTIFACT_MODEL)
    env = {"PATH": os.environ["PATH"], "MLOPS_LAZY_LOADING_DTA": '{"files": []}',
           "LAZY_LOADING_TIMOUT": "30", "LAZY_LOADING_MODE": "blocking"}
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    server.wait_ready()
    assert server.post("/predictUnstructured/", content=b"x").text == "no artifacts needed"
    log = server.log()
    assert "lazy loading is not configured" in log
    assert ("MLOPS_LAZY_LOADING_DTA is not a variable lazy loading reads; did you mean "
            "MLOPS_LAZY_LOADING_DATA?") in log
    assert "LAZY_LOADING_TIMOUT is not a variable lazy loading reads; did you mean " \
           "LAZY_LOADING_TIMEOUT?" in log
    assert "LAZY_LOADING_MODE is not" not in log
    assert "-> downloading" not in log
    assert '{"files": []}' not in log, "values are never logged"


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi", "gunicorn-fastapi"])
def test_every_response_and_access_line_carries_the_request_id(
    kind: str, serve: ServerStarter
) -> None:
    server = serve(kind)
    server.wait_ready()
    client = httpx.Client(base_url=server.base, timeout=5)
    answers = {
        "ping": client.get("/ping/", headers={"X-Request-ID": "rid-ping"}),
        "not found": client.get("/no-such-route", headers={"X-Request-ID": "rid-404"}),
        "wrong method": client.delete("/ping/", headers={"X-Request-ID": "rid-405"}),
    }
    assert [r.status_code for r in answers.values()] == [200, 404, 405]
    assert [r.headers.get("x-request-id") for r in answers.values()] == [
        "rid-ping", "rid-404", "rid-405"]
    fresh = client.get("/ping/", headers={"X-Request-ID": "not a token"}).headers["x-request-id"]
    assert fresh != "not a token" and len(fresh) == 36  # a UUID, as DRUM makes them
    time.sleep(0.5)
    access = [line for line in server.log().splitlines() if "/ping/" in line or "/no-such" in line]
    for rid in ("rid-ping", "rid-404", "rid-405"):
        assert any(f"request_id={rid}" in line for line in access), (rid, access)


def test_readiness_belongs_to_one_server_instance_and_never_to_the_code_dir(
    model_env: tuple[Path, dict[str, str], str], serve: ServerStarter, tmp_path: Path,
) -> None:
    code_dir, _, _ = model_env
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (code_dir / ".lazy_loading").mkdir()
    (code_dir / ".lazy_loading" / "ready").symlink_to(outside)  # where markers used to live
    first = serve("gunicorn-flask", "first.log")
    first.wait_ready()
    second = serve("gunicorn-flask", "second.log")
    second.wait_ready()
    time.sleep(0.5)
    assert first.get("/health/").status_code == 200, "a second server cannot reset the first"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_single_process_uvicorn_is_ready_whatever_max_workers_says(serve: ServerStarter) -> None:
    serve("uvicorn-fastapi", MAX_WORKERS="4").wait_ready(30)


@pytest.mark.parametrize("prefix", ["<path:p>", "{x}", "//api//v1//", "api v1"])
@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_an_invalid_url_prefix_stops_the_server_with_one_line(
    kind: str, prefix: str, serve: ServerStarter
) -> None:
    server = serve(kind, URL_PREFIX=prefix)
    assert server.wait_exit(60) != 0
    assert "URL_PREFIX: must be a path such as /api/v1" in server.log()


@pytest.mark.parametrize("charset", ["no-such-charset", "base64", "idna"])
@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_an_undecodable_charset_is_a_json_error_with_a_request_id(
    kind: str, charset: str, serve: ServerStarter
) -> None:
    server = serve(kind)
    server.wait_ready()
    resp = server.post("/predictUnstructured/", content="héllo".encode(),
                       headers={"Content-Type": f"text/plain; charset={charset}",
                                "X-Request-ID": "rid-charset"})
    if charset == "idna" and resp.status_code == 200:
        return  # a charset Python can decode this body with: nothing to report
    assert resp.status_code == 500, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["message"].startswith("ERROR: ")
    assert resp.headers["x-request-id"] == "rid-charset"
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("source", ["file", "environment"])
def test_what_proc_environ_shows_of_the_credentials(
    source: str, model_env: tuple[Path, dict[str, str], str], serve: ServerStarter,
    tmp_path: Path,
) -> None:
    _, env, _ = model_env
    name = "MLOPS_REPOSITORY_SECRET_CRED_1"
    overrides = {}
    if source == "file":
        secret_file = tmp_path / "credential"
        secret_file.write_text(env[name])
        overrides = {name: "", f"{name}_FILE": str(secret_file)}
    server = serve("gunicorn-flask", **overrides)
    server.wait_ready()
    assert server.post("/predictUnstructured/", json={"x": [1.0]}).status_code == 200
    from tests.procs import live_descendants

    pids = [server.proc.pid, *live_descendants(server.proc.pid)]
    assert len(pids) >= 4, "the master and its three workers"
    environs = [Path(f"/proc/{pid}/environ").read_bytes() for pid in pids]
    leaked = [SECRET_CANARY.encode() in e or TOKEN_CANARY.encode() in e for e in environs]
    if source == "file":
        assert not any(leaked), "a credential file keeps the secret out of /proc/<pid>/environ"
    else:  # what the README says: environment secrets stay visible there
        assert all(leaked)


def _stall(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request)
    return sock


HALF_SENT = [b"GET /ping/ HTTP/1.1\r\nHost: x\r\n",  # the head, unfinished
             b"POST /predictUnstructured/ HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
             b"Content-Length: 100\r\n\r\n{"]  # the body, unfinished


@pytest.mark.parametrize("kind", ["gunicorn-flask", "gunicorn-flask-gevent", "gunicorn-fastapi"])
def test_half_sent_requests_do_not_stop_ping(kind: str, serve: ServerStarter) -> None:
    server = serve(kind, MAX_WORKERS="1", DRUM_GUNICORN_READ_TIMEOUT="600")
    server.wait_ready()
    stalled = [_stall(server.port, HALF_SENT[i % 2]) for i in range(3)]
    try:
        for _ in range(5):
            assert server.get("/ping/", timeout=20).json() == {"message": "OK"}
        assert server.post("/predictUnstructured/", json={"x": [1.0]}).status_code == 200
    finally:
        for sock in stalled:
            sock.close()


def test_a_stalled_request_is_closed_after_the_read_timeout(serve: ServerStarter) -> None:
    server = serve("gunicorn-flask", MAX_WORKERS="1", DRUM_GUNICORN_THREADS="2",
                   DRUM_GUNICORN_READ_TIMEOUT="1")
    server.wait_ready()
    stalled = [_stall(server.port, HALF_SENT[i % 2]) for i in range(4)]  # more than the threads
    try:
        for sock in stalled:
            sock.recv(65536)  # the server's answer or its close; a 30 s socket timeout fails it
        assert server.get("/ping/", timeout=20).status_code == 200
    finally:
        for sock in stalled:
            sock.close()


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) * 1024


def _serving_pid(server: RunningServer) -> int:
    from tests.procs import live_descendants

    workers = list(live_descendants(server.proc.pid))
    assert len(workers) <= 1, "one worker, or the server itself"
    return workers[0] if workers else server.proc.pid


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_a_body_over_the_limit_is_refused_before_it_is_read(
    kind: str, serve: ServerStarter
) -> None:
    server = serve(kind, MAX_WORKERS="1", MAX_REQUEST_BODY_BYTES="1MiB")
    server.wait_ready()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /predictUnstructured/ HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: text/plain\r\nContent-Length: 10737418240\r\n\r\n")
        head = sock.recv(65536)  # answered without a byte of the 10 GiB
    assert head.startswith(b"HTTP/1.1 413"), head
    chunks = (b"x" * 65536 for _ in range(32))  # 2 MiB, chunked: no length to check upfront
    resp = server.post("/predictUnstructured/", content=chunks,
                       headers={"Content-Type": "text/plain"})
    assert resp.status_code == 413
    assert "MAX_REQUEST_BODY_BYTES" in resp.json()["message"]
    assert server.post("/predictUnstructured/", json={"x": [1.0]}).status_code == 200


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_a_large_body_is_held_once(kind: str, serve: ServerStarter) -> None:
    size = 128 * 1024 * 1024
    server = serve(kind, MAX_WORKERS="1", MAX_REQUEST_BODY_BYTES="256MiB")
    server.wait_ready()
    assert server.post("/predictUnstructured/", json={"x": [1.0]}).status_code == 200
    pid = _serving_pid(server)
    before = _peak_rss(pid)
    resp = httpx.post(server.base + "/predictUnstructured/", content=bytes(size), timeout=60,
                      headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 500  # the sample model cannot parse zeros; what counts is memory
    grown = _peak_rss(pid) - before
    assert grown < 1.5 * size, f"peak RSS grew by {grown / size:.2f}x the body"


@pytest.mark.parametrize("kind", ["gunicorn-flask", "uvicorn-fastapi"])
def test_a_body_cut_short_never_reaches_the_model(kind: str, serve: ServerStarter) -> None:
    server = serve(kind, MAX_WORKERS="1")
    server.wait_ready()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(HALF_SENT[1])
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
    assert server.post("/predictUnstructured/", json={"x": [1.0]}).status_code == 200
    assert "score_unstructured failed" not in server.log()


COUNTING_MODEL = '''
import threading

lock, active, peak, second = threading.Lock(), [0], [0], threading.Event()

def load_model(code_dir):
    return None

def score_unstructured(model, data, **kwargs):
    with lock:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        if active[0] >= 2:
            second.set()
    second.wait(2)  # a second call arrives at once where one is allowed in
    with lock:
        active[0] -= 1
    return str(peak[0])
'''


@pytest.mark.parametrize(("kind", "allowed"), [("gunicorn-flask", "1"), ("uvicorn-fastapi", "1"),
                                                ("uvicorn-fastapi", "2")])
def test_hooks_run_one_at_a_time_unless_allowed_more(
    kind: str, allowed: str, servers: list[RunningServer], tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "custom.py").write_text(COUNTING_MODEL)
    env = {"PATH": os.environ["PATH"], "MAX_WORKERS": "1", "MAX_CONCURRENT_PREDICTIONS": allowed}
    server = start_server(kind, code_dir, env, tmp_path / "server.log")
    servers.append(server)
    server.wait_ready()
    def predict(_: int) -> str:
        return httpx.post(server.base + "/predictUnstructured/", content=b"x", timeout=30).text

    with ThreadPoolExecutor(3) as pool:
        peaks = list(pool.map(predict, range(3)))
    assert max(map(int, peaks)) == int(allowed)


def test_a_read_only_code_dir_with_several_workers_becomes_ready(
    servers: list[RunningServer], tmp_path: Path,
) -> None:
    import shutil
    import subprocess

    from tests.servers import server_argv

    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a private mount namespace (unshare -m) for a read-only bind mount")
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "custom.py").write_text(NO_ARTIFACT_MODEL)
    port = free_port()
    argv, extra = server_argv("gunicorn-flask", port, code_dir)
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    env = {"PATH": os.environ["PATH"], **extra, "MAX_WORKERS": "2", "CODE_DIR": str(code_dir),
           "HOME": str(tmp_path)}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script, str(code_dir), *argv],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = RunningServer(proc, port, log_path)
    servers.append(server)
    server.wait_ready()
    assert server.post("/predictUnstructured/", content=b"x").text == "no artifacts needed"
    assert "Read-only file system" in subprocess.run(
        ["nsenter", "-t", str(proc.pid), "-m", "touch", str(code_dir / "probe")],
        capture_output=True, text=True).stderr, "the code dir really is read-only"
