"""The README as a newcomer uses it: the walkthrough runs as written, the examples are valid."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from drum_servers.model import ModelHooks
from lazy_loading import LazyLoadingHandler
from tests.procs import stop_group
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_the_walkthrough_serves_the_greeting_as_written(tmp_path: Path) -> None:
    s3_port, server_port = free_port(), free_port()
    script = "\n".join(_blocks(_section("Serve your own model in five minutes"), "bash"))
    script = script.replace("127.0.0.1:9000", f"127.0.0.1:{s3_port}").replace(
        "-p 9000", f"-p {s3_port}").replace("127.0.0.1:8080", f"127.0.0.1:{server_port}")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(tmp_path)}
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_group(proc)  # the walkthrough leaves both servers running in the background
    assert proc.returncode == 0, out + (tmp_path / "server.log").read_text(errors="replace")
    assert out.strip().endswith("Hello, world!"), out
    assert (tmp_path / "greeter" / "artifacts" / "greeting.txt").read_text() == "Hello"


def test_the_examples_to_copy_are_valid(tmp_path: Path) -> None:
    examples = _section("Examples to copy")
    data, credential = (json.loads(b) for b in _blocks(examples, "json"))
    (values,) = _blocks(examples, "yaml")
    (custom,) = _blocks(examples, "python")

    env = {"MLOPS_LAZY_LOADING_DATA": json.dumps(data),
           "MLOPS_REPOSITORY_SECRET_S3_READER": json.dumps(credential)}
    from_env = LazyLoadingHandler(code_dir=tmp_path, environ=env).load_config()
    (tmp_path / "values.yaml").write_text(values)
    from_yaml = LazyLoadingHandler(code_dir=tmp_path, environ={},
                                   values_file=tmp_path / "values.yaml").load_config()
    assert [f.local_path for f in from_env.data.files] == [
        f.local_path for f in from_yaml.data.files] == ["artifacts/weights.bin",
                                                        "artifacts/config.json"]
    assert yaml.safe_load(values)["credentials"][0]["id"] == data["repositories"][0]["credentialId"]

    (tmp_path / "custom.py").write_text(custom)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "config.json").write_text('{"v": 3}')
    ModelHooks.check(tmp_path)
    hooks = ModelHooks.load(tmp_path)
    hooks.init()
    model = hooks.load_model()
    out, meta = hooks.score_unstructured(model, '{"a": 1}', mimetype="application/json",
                                         charset="utf-8", query={})
    assert json.loads(out) == {"echo": {"a": 1}, "model": {"v": 3}}
    assert meta == {"mimetype": "application/json"}
