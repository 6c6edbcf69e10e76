"""DRUM itself as the oracle: the same code dirs served by ``drum server`` (datarobot-drum 1.18.1)
and by our Flask and FastAPI servers, the same requests to each, the answers compared.

Run by ``make parity``, which builds ``.venv-drum`` (DRUM plus this package) and sets
``DRUM_VENV``; every server runs from that venv, so a model importing ``datarobot_drum`` works
in all three.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import stop_group
from tests.servers import ROOT, free_port

DRUM_VENV = os.environ["DRUM_VENV"]  # conftest leaves this module out without it

# DRUM's own fixtures and template, as DRUM ships them (comments and licence header dropped).
TEMPLATE_MODEL = '''
import logging
from io import BytesIO
import werkzeug

logger = logging.getLogger(__name__)

def load_model(input_dir):
    return "dummy"

def score_unstructured(model, data, query, **kwargs):
    headers = kwargs.get("headers")
    if headers and "multipart/form-data" in headers.get("Content-Type"):
        environ = {
            "wsgi.input": BytesIO(data),
            "CONTENT_LENGTH": headers.get("Content-Length"),
            "CONTENT_TYPE": headers.get("Content-Type"),
            "REQUEST_METHOD": "POST",
        }
        stream, form, files = werkzeug.formparser.parse_form_data(environ)
        filestorage = files.get("filekey")
        data = filestorage.stream.read()
    text_data = data.decode("utf8") if isinstance(data, bytes) else data
    text_data = text_data.strip().replace("  ", " ")
    words_count = text_data.count(" ") + 1
    ret_mode = query.get("ret_mode", "")
    if ret_mode == "binary":
        ret_data = words_count.to_bytes(4, byteorder="big")
        ret_kwargs = {"mimetype": "application/octet-stream"}
        ret = ret_data, ret_kwargs
    else:
        ret = str(words_count)
    return ret
'''

PARAMS_MODEL = '''
def load_model(input_dir):
    return "dummy"

def score_unstructured(model, data, query=None, **kwargs):
    ret_kwargs = {}
    if query["ret_one_or_two"] == "one":
        return data
    elif query["ret_one_or_two"] == "one-with-none":
        return data, None
    else:
        if "ret_mimetype" in query:
            ret_kwargs["mimetype"] = query["ret_mimetype"]
        if "ret_charset" in query:
            ret_kwargs["charset"] = query["ret_charset"]
        return data, ret_kwargs
'''

HOOKS_MODEL = '''
prediction_value = None

def init(**kwargs):
    global prediction_value
    prediction_value = 1

def load_model(input_dir):
    global prediction_value
    prediction_value += 1
    return "dummy"

def score_unstructured(model, data, **kwargs):
    global prediction_value
    prediction_value += 1
    return str(prediction_value)
'''

# Our probe: what the hook receives, and the errors a hook can raise.
PROBE_MODEL = '''
import json
from datarobot_drum import CustomHTTPError

def load_model(input_dir):
    return "dummy"

def score_unstructured(model, data, **kwargs):
    query = kwargs["query"]
    if "raise" in query:
        kind = query["raise"]
        if kind == "http":
            raise CustomHTTPError("I am a teapot", 418)
        if kind == "http-default":
            raise CustomHTTPError()
        if kind == "multiline":
            raise ValueError("first line\\nsecond line")
        raise ValueError("bad input: " + kind)
    headers = kwargs.get("headers") or {}
    return json.dumps({
        "data_type": type(data).__name__,
        "data": data if isinstance(data, str) else data.hex(),
        "kwargs": sorted(kwargs),
        "mimetype": kwargs.get("mimetype"),
        "charset": kwargs.get("charset", "<absent>"),
        "query_first": {k: query.get(k) for k in query},
        "query_lists": {k: query.getlist(k) for k in query},
        "content_type_header": headers.get("Content-Type"),
        "custom_header": headers.get("X-Custom"),
    }, sort_keys=True)
'''

PICKLE_ONLY_MODEL = '''
def score_unstructured(model, data, **kwargs):
    return model["greeting"] + " " + (data if isinstance(data, str) else data.decode())
'''

BROKEN_MODEL = '''
def load_model(input_dir):
    raise RuntimeError("cannot load the weights")

def score_unstructured(model, data, **kwargs):
    return "never"
'''

MODELS: dict[str, str] = {"template": TEMPLATE_MODEL, "params": PARAMS_MODEL,
                          "hooks": HOOKS_MODEL, "probe": PROBE_MODEL,
                          "pickle": PICKLE_ONLY_MODEL, "broken": BROKEN_MODEL}
# DRUM's --with-error-server, our WITH_ERROR_SERVER=1
ERROR_SERVER_MODELS = {"broken"}
SERVERS = ("drum", "flask", "fastapi")
DRUM_HEADERS = ("X-Drum-Version",)


@dataclass(frozen=True)
class Probe:
    model: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] | None = None
    compare: str = "exact"  # or "status"; "subset": DRUM's JSON is within ours; "info";
    # "keys": the same JSON shape; "message": an "ERROR: " message of the same status
    name: str = ""

    @property
    def id(self) -> str:
        return self.name or f"{self.model}:{self.method} {self.path}"


def _probes() -> list[Probe]:
    words = b"one two three four five six seven eight nine ten"
    probes = [
        # the template: word counts, multipart through `headers`, binary answers
        Probe("template", "POST", "/predictUnstructured/", words, {"Content-Type": "text/plain"}),
        Probe("template", "POST", "/predictUnstructured/?ret_mode=binary", words,
              {"Content-Type": "text/plain"}),
        Probe("template", "POST", "/predictionsUnstructured/", words),
        Probe("template", "POST", "/predictUnstructured/", files={"filekey": ("f.txt", words)},
              name="template:multipart upload"),
        # every return type of the params fixture
        *(Probe("params", "POST", f"/predictUnstructured/?{query}", body, {"Content-Type": ctype})
          for query in ("ret_one_or_two=one", "ret_one_or_two=one-with-none",
                        "ret_one_or_two=two", "ret_one_or_two=two&ret_mimetype=application/xml",
                        "ret_one_or_two=two&ret_mimetype=text/csv&ret_charset=latin-1",
                        "ret_one_or_two=two&ret_charset=utf-16")
          for body, ctype in ((b"text body", "text/plain"), (b"\x00\x01binary", "application/"
                                                                               "octet-stream"))),
        # the counter of the all-hooks fixture: init, load_model and each call, in order
        *(Probe("hooks", "POST", "/predictUnstructured/", b"x", name=f"hooks:call {i}")
          for i in range(3)),
        # decoding: DRUM's rule, header by header
        *(Probe("probe", "POST", "/predictUnstructured/?a=1&a=2&b=3", body, headers,
                name=f"probe:{name}")
          for name, body, headers in (
              ("no content type", b"plain", {}),
              ("empty content type", b"plain", {"Content-Type": ""}),
              ("text/plain", "héllo".encode(), {"Content-Type": "text/plain"}),
              ("text/csv latin-1", "héllo".encode("latin-1"),
               {"Content-Type": "text/csv; charset=latin-1"}),
              ("application/json", b'{"a": 1}', {"Content-Type": "application/json"}),
              ("application/xml", b"<a/>", {"Content-Type": "application/xml"}),
              ("form", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}),
              ("octet-stream", b"\x00\xff", {"Content-Type": "application/octet-stream"}),
              ("binary with charset", b"\x00\xff",
               {"Content-Type": "application/octet-stream; charset=utf-8"}),
              ("quoted charset", "é".encode(), {"Content-Type": 'text/plain; charset="utf-8"'}),
              ("custom header", b"x", {"Content-Type": "text/plain", "X-Custom": "yes"}),
              ("invalid utf-8", b"\xff\xfe", {"Content-Type": "text/plain"}),
              ("unknown charset", b"x", {"Content-Type": "text/plain; charset=no-such"}),
          )),
        # errors raised by a hook
        *(Probe("probe", "POST", f"/predictUnstructured/?raise={kind}", b"x",
                {"Content-Type": "text/plain"}) for kind in ("value", "http", "http-default")),
        # DRUM's other routes
        *(Probe("probe", "GET", path) for path in ("/", "/ping/", "/ping", "/capabilities/")),
        Probe("probe", "GET", "/health/", compare="subset"),  # ours adds the readiness detail
        Probe("probe", "GET", "/info/", compare="info"),
        Probe("probe", "GET", "/stats/", compare="keys"),
        *(Probe("probe", "POST", path, b"x") for path in ("/predict/", "/predictions/",
                                                          "/invocations", "/transform/")),
        Probe("probe", "GET", "/ping/", headers={"X-Request-ID": "rid-123"},
              name="probe:request id echoed"),
        # framework answers: the status (and DRUM's headers) must match; bodies are the
        # framework's own (see the README's differences table)
        Probe("probe", "GET", "/no/such/route", compare="status"),
        Probe("probe", "GET", "/predictUnstructured/", compare="status"),
        Probe("probe", "HEAD", "/ping/", compare="status"),
        Probe("probe", "OPTIONS", "/ping/", compare="status"),
        # a failed start, served as errors
        *(Probe("broken", method, path, b"x" if method == "POST" else None, compare="message")
          for method, path in (("GET", "/"), ("GET", "/ping/"), ("GET", "/health/"),
                               ("POST", "/predictUnstructured/"), ("POST", "/predict/"),
                               ("POST", "/transform/"))),
        # a pickle and no load_model: DRUM's built-in loading
        Probe("pickle", "POST", "/predictUnstructured/", b"world", {"Content-Type": "text/plain"}),
    ]
    return probes


PROBES = _probes()


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str | None
    headers: dict[str, str]

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "content_type": self.content_type,
                "body": self.body[:300]}


def _write_model(code_dir: Path, source: str) -> None:
    code_dir.mkdir(parents=True)
    (code_dir / "custom.py").write_text(source)
    if source is PICKLE_ONLY_MODEL:
        (code_dir / "model.pkl").write_bytes(pickle.dumps({"greeting": "hello"}))


def _argv(server: str, code_dir: Path, port: int, error_server: bool
          ) -> tuple[list[str], dict[str, str]]:
    venv = Path(DRUM_VENV)
    address = f"127.0.0.1:{port}"
    if server == "drum":
        flags = ["--with-error-server"] if error_server else []
        return [str(venv / "bin/drum"), "server", "--code-dir", str(code_dir), "--address",
                address, "--target-type", "unstructured", *flags], {}
    env = {"WITH_ERROR_SERVER": "1"} if error_server else {}
    if server == "flask":
        return [str(venv / "bin/python"), "-m", "gunicorn", "-c",
                str(ROOT / "deploy/gunicorn.conf.py")], {"ADDRESS": address, **env}
    return [str(venv / "bin/python"), "-m", "uvicorn", "--factory",
            "drum_servers.fastapi_app:create_app", "--host", "127.0.0.1", "--port", str(port)], env


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path


def _start(server: str, code_dir: Path, log: Path, error_server: bool) -> Running:
    port = free_port()
    argv, extra = _argv(server, code_dir, port, error_server)
    env = {"PATH": os.environ["PATH"], "HOME": str(code_dir.parent), "CODE_DIR": str(code_dir),
           "PYTHONUNBUFFERED": "1", **extra}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=code_dir.parent, start_new_session=True)
    return Running(proc, f"http://127.0.0.1:{port}", log)


def _wait_up(running: Running, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            raise AssertionError(f"exited {running.proc.returncode}:\n{running.log.read_text()}")
        try:
            if httpx.get(running.base + "/ping/", timeout=1).status_code in (200, 513):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not up after {timeout} s:\n{running.log.read_text()}")


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Answer]]]:
    """Every probe sent, in order, to each of the three servers of each model."""
    base = tmp_path_factory.mktemp("parity")
    running: dict[tuple[str, str], Running] = {}
    try:
        for model, source in MODELS.items():
            code_dir = base / model / "code"  # shared: /info/ shows it
            _write_model(code_dir, source)
            for server in SERVERS:
                running[server, model] = _start(server, code_dir, base / model / f"{server}.log",
                                                model in ERROR_SERVER_MODELS)
        with ThreadPoolExecutor(len(running)) as pool:
            list(pool.map(_wait_up, running.values()))
        result: dict[str, list[Answer]] = {server: [] for server in SERVERS}
        for server in SERVERS:
            with httpx.Client(timeout=30) as client:
                for probe in PROBES:
                    resp = client.request(probe.method, running[server, probe.model].base
                                          + probe.path, content=probe.body,
                                          headers=probe.headers, files=probe.files)
                    result[server].append(Answer(resp.status_code, resp.content,
                                                 resp.headers.get("content-type"),
                                                 dict(resp.headers)))
        yield result
    finally:
        for proc in running.values():
            stop_group(proc.proc)


@pytest.mark.parametrize("server", ["flask", "fastapi"])
@pytest.mark.parametrize("index", range(len(PROBES)), ids=[p.id for p in PROBES])
def test_same_answer_as_drum(server: str, index: int, answers: dict[str, list[Answer]]) -> None:
    probe = PROBES[index]
    drum, ours = answers["drum"][index], answers[server][index]
    expected: dict[str, Any] = {"status": drum.status}
    actual: dict[str, Any] = {"status": ours.status}
    if probe.compare != "status":
        expected.update(content_type=drum.content_type)
        actual.update(content_type=ours.content_type)
    if probe.compare == "exact":
        expected.update(body=drum.body)
        actual.update(body=ours.body)
    elif probe.compare == "message":  # DRUM wraps the cause in text of its own
        expected.update(message=json.loads(drum.body)["message"].startswith("ERROR: "))
        actual.update(message=json.loads(ours.body)["message"].startswith("ERROR: "))
        assert "cannot load the weights" in json.loads(ours.body)["message"]
    elif probe.compare == "subset":
        ours_json = json.loads(ours.body)
        expected.update(body=json.loads(drum.body))
        actual.update(body={k: ours_json.get(k) for k in json.loads(drum.body)})
    elif probe.compare == "info":  # drumServer names the framework serving it
        drum_json, ours_json = json.loads(drum.body), json.loads(ours.body)
        assert ours_json.pop("drumServer") == server
        drum_json.pop("drumServer")
        expected.update(body=drum_json)
        actual.update(body=ours_json)
    elif probe.compare == "keys":
        def keys(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: keys(v) for k, v in value.items()}
            if isinstance(value, list):
                return [keys(v) for v in value[:1]]
            # a number or null: DRUM leaves the prediction times of unstructured models null
            return "number" if isinstance(value, float | int | None) else type(value).__name__

        expected.update(body=keys(json.loads(drum.body)))
        actual.update(body=keys(json.loads(ours.body)))
    for name in (*DRUM_HEADERS, "X_Request_ID", "X-Drum-User-Http-Error"):
        expected[name] = name.lower() in {k.lower() for k in drum.headers}
        actual[name] = name.lower() in {k.lower() for k in ours.headers}
    if "X-Request-ID" in probe.headers:
        expected["echo"] = drum.headers.get("x_request_id")
        actual["echo"] = ours.headers.get("x_request_id")
    assert actual == expected, json.dumps({"drum": drum.summary(), server: ours.summary()},
                                          default=repr, indent=1)
