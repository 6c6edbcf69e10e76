"""Flask and FastAPI adapters in-process: the DRUM unstructured contract and composition."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drum_servers.readiness import reset_state

ECHO_MODEL = '''
import json

def init(code_dir, **kwargs):
    global INIT_CALLED
    INIT_CALLED = code_dir

def load_model(code_dir):
    return {"code_dir": code_dir, "init": INIT_CALLED}

def score_unstructured(model, data, **kwargs):
    query = kwargs["query"]
    if query.get("fail"):
        raise ValueError("model rejected input")
    if query.get("raw"):
        return b"\\x00\\x01", {"mimetype": "application/x-custom"}
    payload = data if isinstance(data, str) else data.hex()
    return json.dumps({"type": type(data).__name__, "data": payload,
                       "mimetype": kwargs["mimetype"], "charset": kwargs.get("charset"),
                       "query": {k: query.get(k) for k in query}, "init": model["init"]})
'''


@pytest.fixture
def code_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "custom.py").write_text(ECHO_MODEL)
    for name in ("MLOPS_LAZY_LOADING_DATA", "LAZY_LOADING_FILE", "LAZY_LOADING_MODE", "URL_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CODE_DIR", str(tmp_path))
    reset_state()
    yield tmp_path
    reset_state()


class _Client:
    """The same calls against Flask's and Starlette's test clients."""

    def __init__(self, kind: str, prefix: str = "") -> None:
        self.kind = kind
        self._stack = contextlib.ExitStack()
        if kind == "flask":
            from drum_servers.flask_app import create_app

            self._client: Any = create_app(url_prefix=prefix).test_client()
        else:
            from fastapi.testclient import TestClient

            from drum_servers.fastapi_app import create_app as create_fastapi

            self._client = self._stack.enter_context(TestClient(create_fastapi(url_prefix=prefix)))

    def post(self, path: str, body: bytes, content_type: str | None) -> tuple[int, bytes, str]:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.kind == "flask":
            r = self._client.post(path, data=body, headers=headers)
            return r.status_code, r.data, r.headers.get("Content-Type", "")
        r = self._client.post(path, content=body, headers=headers)
        return r.status_code, r.content, r.headers.get("content-type", "")

    def get(self, path: str) -> tuple[int, Any]:
        r = self._client.get(path)
        data = r.data if self.kind == "flask" else r.content
        return r.status_code, json.loads(data)

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(params=["flask", "fastapi"])
def client(request: pytest.FixtureRequest, code_dir: Path) -> Iterator[_Client]:
    c = _Client(request.param)
    yield c
    c.close()


def test_text_body_is_str_decoded_with_request_charset(client: _Client, code_dir: Path) -> None:
    status, body, ctype = client.post("/predictUnstructured/?a=1&b=x",
                                      "héllo".encode("latin-1"), "text/plain; charset=latin-1")
    assert status == 200
    out = json.loads(body)
    assert out == {"type": "str", "data": "héllo", "mimetype": "text/plain",
                   "charset": "latin-1", "query": {"a": "1", "b": "x"}, "init": str(code_dir)}
    assert ctype.startswith("text/plain")


def test_binary_body_is_bytes(client: _Client) -> None:
    status, body, _ = client.post("/predictUnstructured", b"\xff\x00", "application/octet-stream")
    assert status == 200
    assert json.loads(body)["type"] == "bytes"
    assert json.loads(body)["data"] == "ff00"


def test_json_body_is_str(client: _Client) -> None:
    status, body, _ = client.post("/predictionsUnstructured/", b'{"x": 1}', "application/json")
    assert status == 200 and json.loads(body)["type"] == "str"


def test_bytes_result_with_mimetype(client: _Client) -> None:
    status, body, ctype = client.post("/predictUnstructured/?raw=1", b"", None)
    assert (status, body) == (200, b"\x00\x01")
    assert ctype.startswith("application/x-custom")


def test_hook_exception_is_500_with_short_message(client: _Client) -> None:
    status, body, _ = client.post("/predictUnstructured/?fail=1", b"{}", "application/json")
    assert status == 500
    message = json.loads(body)["message"]
    assert message == "ERROR: model rejected input"  # DRUM's text, word for word
    assert "Traceback" not in body.decode()


def test_liveness_readiness_info(client: _Client, code_dir: Path) -> None:
    assert client.get("/") == (200, {"message": "OK"})
    assert client.get("/ping/") == (200, {"message": "OK"})
    assert client.get("/health") == (200, {"message": "OK", "status": "ready"})
    status, info = client.get("/info/")
    assert status == 200
    assert info == {"codeDir": str(code_dir), "drumServer": client.kind,
                    "drumVersion": "1.18.1", "language": "python", "modelMetadata": None,
                    "predictor": None, "targetType": "unstructured"}, "DRUM's fields only"


@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_info_details_are_opt_in(kind: str, code_dir: Path, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    (code_dir / "model-metadata.yaml").write_text("name: echo\ntargetType: unstructured\n")
    monkeypatch.setenv("INFO_DETAILS", "true")
    c = _Client(kind)
    try:
        status, info = c.get("/info/")
    finally:
        c.close()
    assert status == 200
    assert info["modelMetadata"] == {"name": "echo", "targetType": "unstructured"}
    details = info["drumServers"]
    assert details["status"] == "ready" and details["artifacts"] == []
    assert details["pid"] > 0 and details["versions"]["drum-lazy-loading"]


@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_url_prefix(kind: str, code_dir: Path) -> None:
    c = _Client(kind, prefix="/model/v1")
    try:
        assert c.get("/model/v1/ping/") == (200, {"message": "OK"})
        status, _, _ = c.post("/model/v1/predictUnstructured/", b"{}", "application/json")
        assert status == 200
    finally:
        c.close()


def test_flask_init_app_on_an_existing_app(code_dir: Path) -> None:
    from flask import Flask

    from drum_servers.flask_app import init_app

    app = Flask("users_app")

    @app.get("/custom")
    def custom() -> str:
        return "mine"

    state = init_app(app)
    assert state.ready
    client = app.test_client()
    assert client.get("/custom").data == b"mine"
    assert client.get("/ping/").json == {"message": "OK"}


def test_fastapi_lifespan_composes_with_the_users_lifespan(code_dir: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from drum_servers.fastapi_app import make_lifespan, make_router
    from drum_servers.readiness import current_state

    events: list[str] = []

    @contextlib.asynccontextmanager
    async def users(app: FastAPI) -> AsyncIterator[None]:
        events.append(f"user startup, model ready={current_state().ready}")
        yield
        events.append("user shutdown")

    app = FastAPI(lifespan=make_lifespan(inner=users))
    app.include_router(make_router(current_state))
    with TestClient(app) as client:
        assert client.get("/health/").json() == {"message": "OK", "status": "ready"}
    assert events == ["user startup, model ready=True", "user shutdown"]


def test_load_model_failure_propagates_the_users_exception(code_dir: Path) -> None:
    (code_dir / "custom.py").write_text(
        "def load_model(code_dir):\n    raise RuntimeError('weights corrupt')\n"
        "def score_unstructured(model, data, **kw):\n    return ''\n"
    )
    from drum_servers.flask_app import create_app

    with pytest.raises(RuntimeError, match="weights corrupt"):
        create_app()


def test_missing_custom_py_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lazy_loading import ConfigError

    monkeypatch.delenv("MLOPS_LAZY_LOADING_DATA", raising=False)
    monkeypatch.setenv("CODE_DIR", str(tmp_path))
    reset_state()
    from drum_servers.flask_app import create_app

    with pytest.raises(ConfigError, match=r"custom\.py not found"):
        create_app()
    reset_state()


def test_request_id_is_echoed_or_generated(client: _Client) -> None:
    raw = client._client
    if client.kind == "flask":
        given = raw.get("/ping/", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        fresh = raw.get("/ping/", headers={"X-Request-ID": "bad id with spaces"}).headers[
            "X-Request-ID"]
    else:
        given = raw.get("/ping/", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        fresh = raw.get("/ping/", headers={"X-Request-ID": "bad id with spaces"}).headers[
            "x-request-id"]
    assert given == "abc-123"
    assert fresh != "bad id with spaces" and len(fresh) == 36  # a UUID, as DRUM makes them


def test_metrics_endpoint_counts_requests_and_readiness(client: _Client) -> None:
    client.post("/predictUnstructured/", b"{}", "application/json")
    raw = client._client.get("/metrics")
    text = (raw.data if client.kind == "flask" else raw.content).decode()
    assert raw.status_code == 200
    assert "drum_servers_ready 1.0" in text
    assert 'drum_servers_requests_total{route="predict",status="200"}' in text
