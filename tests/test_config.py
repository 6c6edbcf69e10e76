"""Validation happens before any network call; each failure is one line naming the field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lazy_loading import ConfigError, LazyLoadingHandler, LazyLoadingSettings
from lazy_loading.config import load_config
from tests.conftest import SECRET_CANARY, TOKEN_CANARY

CRED = {"credentialType": "s3", "awsAccessKeyId": "AKIAX", "awsSecretAccessKey": SECRET_CANARY,
        "awsSessionToken": TOKEN_CANARY}


def _data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "files": [{"remotePath": "m/w.bin", "localPath": "w.bin", "repositoryId": "r1"}],
        "repositories": [{"repositoryId": "r1", "bucketName": "bkt", "credentialId": "c1",
                          "endpointUrl": "http://127.0.0.1:1"}],
    }
    data.update(overrides)
    return data


def _env(data: Any, cred: Any = CRED, raw: str | None = None) -> dict[str, str]:
    env = {"MLOPS_LAZY_LOADING_DATA": raw if raw is not None else json.dumps(data)}
    if cred is not None:
        env["MLOPS_REPOSITORY_SECRET_C1"] = cred if isinstance(cred, str) else json.dumps(cred)
    return env


def _file(**kw: Any) -> dict[str, Any]:
    return {"remotePath": "m/w.bin", "localPath": "w.bin", "repositoryId": "r1", **kw}


def _repo(**kw: Any) -> dict[str, Any]:
    return {"repositoryId": "r1", "bucketName": "bkt", "credentialId": "c1", **kw}


CASES: list[tuple[str, dict[str, str], str]] = [
    ("malformed json", _env(None, raw="{not json"), r"MLOPS_LAZY_LOADING_DATA: not valid JSON"),
    ("not an object", _env(None, raw="[1, 2]"), r"MLOPS_LAZY_LOADING_DATA: expected a mapping"),
    ("missing files", _env({"repositories": [_repo()]}), r"files: is required"),
    ("missing repositories", _env({"files": [_file()]}), r"repositories: is required"),
    ("empty files", _env(_data(files=[])), r"files: must not be empty"),
    ("empty repositories", _env(_data(repositories=[])), r"repositories: must not be empty"),
    ("empty remotePath", _env(_data(files=[_file(remotePath="")])),
     r"files\[0\]\.remotePath: must not be empty"),
    ("empty localPath", _env(_data(files=[_file(localPath="")])),
     r"files\[0\]\.localPath: must not be empty"),
    ("empty bucketName", _env(_data(repositories=[_repo(bucketName="")])),
     r"repositories\[0\]\.bucketName: must not be empty"),
    ("unknown repositoryId", _env(_data(files=[_file(repositoryId="nope")])),
     r"files\[0\]\.repositoryId 'nope' names no repository"),
    ("empty endpointUrl camelCase", _env(_data(repositories=[_repo(endpointUrl="")])),
     r"repositories\[0\]\.endpointUrl: must not be empty"),
    ("non-http endpoint", _env(_data(repositories=[_repo(endpointUrl="ftp://x")])),
     r"endpointUrl: must be an http:// or https:// URL"),
    ("credentials in endpoint", _env(_data(repositories=[_repo(endpointUrl="http://u:p@h")])),
     r"endpointUrl: must not contain credentials"),
    ("case-variant key", _env(_data(repositories=[_repo(endpointURL="http://h")])),
     r"repositories\[0\]: unknown key 'endpointURL'; did you mean 'endpointUrl'\?"),
    ("missing credential env", _env(_data(), cred=None),
     r"MLOPS_REPOSITORY_SECRET_C1 is not set \(credential 'c1' of repositories\[0\]\)"),
    ("malformed credential json", _env(_data(), cred="{oops"),
     r"MLOPS_REPOSITORY_SECRET_C1: not valid JSON"),
    ("credential missing a field", _env(_data(), cred={"credentialType": "s3",
                                                       "awsSecretAccessKey": SECRET_CANARY}),
     r"MLOPS_REPOSITORY_SECRET_C1: awsAccessKeyId: is required"),
    ("credential without credentialType", _env(_data(), cred={
        "awsAccessKeyId": "AKIAX", "awsSecretAccessKey": SECRET_CANARY}),
     r"MLOPS_REPOSITORY_SECRET_C1: credentialType: is required"),
    ("unsupported credentialType", _env(_data(), cred={**CRED, "credentialType": "gcp"}),
     r"MLOPS_REPOSITORY_SECRET_C1: credentialType: must be 's3'"),
    ("duplicate target", _env(_data(files=[_file(), _file(remotePath="other")])),
     r"files\[1\]\.localPath 'w.bin' resolves to the same file as files\[0\]"),
    ("dot-dot escape", _env(_data(files=[_file(localPath="../outside.bin")])),
     r"files\[0\]\.localPath '\.\./outside\.bin' resolves to .*, outside the code dir"),
    ("absolute escape", _env(_data(files=[_file(localPath="/etc/passwd")])),
     r"files\[0\]\.localPath '/etc/passwd' resolves to /etc/passwd, outside the code dir"),
    ("bad sha256", _env(_data(files=[_file(sha256="abc")])),
     r"files\[0\]\.sha256: must be 64 hexadecimal characters"),
    ("remotePath is a folder marker", _env(_data(files=[_file(remotePath="models/v1/")])),
     r"files\[0\]\.remotePath: ends with '/', which names a folder marker"),
    ("localPath is a directory", _env(_data(files=[_file(localPath="artifacts/")])),
     r"files\[0\]\.localPath: names a directory"),
    ("NUL in localPath", _env(_data(files=[_file(localPath="a\x00b.bin")])),
     r"files\[0\]\.localPath: must not contain control characters"),
    ("newline in remotePath", _env(_data(files=[_file(remotePath="a\nINFO forged")])),
     r"files\[0\]\.remotePath: must not contain control characters"),
    ("size is a boolean", _env(_data(files=[_file(size=True)])),
     r"files\[0\]\.size: must be an integer"),
    ("endpoint port out of range", _env(_data(repositories=[_repo(endpointUrl="http://h:99999")])),
     r"repositories\[0\]\.endpointUrl: has an invalid port"),
    ("endpoint port not a number", _env(_data(repositories=[_repo(endpointUrl="http://h:abc")])),
     r"repositories\[0\]\.endpointUrl: has an invalid port"),
    ("bucket with a slash", _env(_data(repositories=[_repo(bucketName="bkt/prefix")])),
     r"repositories\[0\]\.bucketName: must be a bucket name"),
    ("invalid region", _env(_data(repositories=[_repo(region="us east 1!")])),
     r"repositories\[0\]\.region: must be a region name"),
    ("missing caBundle", _env(_data(repositories=[_repo(caBundle="/no/such/ca.pem")])),
     r"repositories\[0\]\.caBundle: /no/such/ca\.pem does not exist"),
    ("caBundle is a directory", _env(_data(repositories=[_repo(caBundle="/tmp")])),
     r"repositories\[0\]\.caBundle: /tmp is a directory"),
    ("newline inside the session token", _env(_data(), cred={
        **CRED, "awsSessionToken": TOKEN_CANARY + "\nX-Forged: 1"}),
     r"MLOPS_REPOSITORY_SECRET_C1: awsSessionToken: contains control characters"),
    ("duplicate JSON key", _env(None, raw='{"files": [], "files": []}'),
     r"MLOPS_LAZY_LOADING_DATA: duplicate key 'files'"),
    ("JSON nested 100,000 deep", _env(None, raw="[" * 100_000 + "]" * 100_000),
     r"MLOPS_LAZY_LOADING_DATA: nested too deeply"),
    ("localPath replaces custom.py", _env(_data(files=[_file(localPath="custom.py")])),
     r"files\[0\]\.localPath 'custom\.py' would replace the model's own custom\.py"),
]


@pytest.mark.parametrize(("env", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_config_is_one_clear_line_and_never_leaks(
    env: dict[str, str], pattern: str, tmp_path: Path
) -> None:
    handler = LazyLoadingHandler(code_dir=tmp_path, environ=env)
    with pytest.raises(ConfigError) as info:
        handler.download_lazy_loading_files()
    message = str(info.value)
    assert "\n" not in message
    assert SECRET_CANARY not in message and TOKEN_CANARY not in message
    assert SECRET_CANARY not in repr(info.value)
    import re

    assert re.search(pattern, message), message
    assert list(tmp_path.iterdir()) == [], "nothing is written for a bad config"


def test_symlink_escape_is_rejected(tmp_path: Path) -> None:
    code_dir = tmp_path / "code"
    outside = tmp_path / "outside"
    code_dir.mkdir()
    outside.mkdir()
    (code_dir / "link").symlink_to(outside)
    env = _env(_data(files=[_file(localPath="link/w.bin")]))
    with pytest.raises(ConfigError, match=r"resolves to .*outside.*outside the code dir"):
        LazyLoadingHandler(code_dir=code_dir, environ=env).load_config()


def test_allowed_roots_admit_paths_outside_the_code_dir(tmp_path: Path) -> None:
    code_dir, shared = tmp_path / "code", tmp_path / "shared"
    code_dir.mkdir()
    env = _env(_data(files=[_file(localPath=str(shared / "w.bin"))]))
    env["LAZY_LOADING_ALLOWED_ROOTS"] = str(shared)
    LazyLoadingHandler(code_dir=code_dir, environ=env).load_config()


def test_snake_case_and_camel_case_are_both_accepted() -> None:
    snake = {
        "files": [{"remote_path": "k", "local_path": "w.bin", "repository_id": "r1"}],
        "repositories": [{"repository_id": "r1", "bucket_name": "bkt", "credential_id": "c1",
                          "endpoint_url": "https://s3.example.com", "extra": 1}],
    }
    config = load_config(_env(snake))
    assert config is not None
    repo = config.data.repositories[0]
    assert repo.endpoint_url == "https://s3.example.com"
    assert repo.verify_certificate is True, "verifyCertificate defaults to true in snake_case"
    camel = load_config(_env(_data(repositories=[_repo(endpointUrl="https://s3.example.com")])))
    assert camel is not None and camel.data.repositories[0].verify_certificate is True


def test_credential_id_with_dashes_maps_to_a_shell_safe_env_name() -> None:
    data = _data(repositories=[_repo(credentialId="my-cred.1")])
    env = {"MLOPS_LAZY_LOADING_DATA": json.dumps(data),
           "MLOPS_REPOSITORY_SECRET_MY_CRED_1": json.dumps(CRED)}
    config = load_config(env)
    assert config is not None and "my-cred.1" in config.credentials


def test_secrets_are_hidden_in_repr_and_str() -> None:
    config = load_config(_env(_data()))
    assert config is not None
    for text in (repr(config), str(config), repr(config.credentials), str(config.credentials)):
        assert SECRET_CANARY not in text and TOKEN_CANARY not in text


def test_not_configured_is_a_no_op(tmp_path: Path) -> None:
    handler = LazyLoadingHandler(code_dir=tmp_path, environ={})
    assert handler.is_lazy_loading_available is False
    assert handler.download_lazy_loading_files() == []


VALUES_YAML = f"""
files:
  - {{remotePath: models/m.bin, localPath: m.bin, repositoryId: repo1}}
repositories:
  - {{repositoryId: repo1, bucketName: my-bucket, credentialId: cred1, endpointUrl: "http://127.0.0.1:1"}}
credentials:
  - {{id: cred1, credentialType: s3, awsAccessKeyId: AKIAX, awsSecretAccessKey: {SECRET_CANARY}}}
"""


def test_values_file_sets_drum_environment(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(VALUES_YAML)
    env: dict[str, str] = {}
    LazyLoadingHandler.setup_environment_variables_from_values_file(path, env)
    data = json.loads(env["MLOPS_LAZY_LOADING_DATA"])
    assert data["files"][0]["remote_path"] == "models/m.bin"
    assert json.loads(env["MLOPS_REPOSITORY_SECRET_CRED1"])["awsSecretAccessKey"] == SECRET_CANARY
    config = load_config(env)
    assert config is not None and config.data.repositories[0].verify_certificate is True


def test_values_file_is_read_directly(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(VALUES_YAML)
    config = load_config({"LAZY_LOADING_FILE": str(path)})
    assert config is not None and config.data.files[0].local_path == "m.bin"


@pytest.mark.parametrize(("text", "pattern"), [
    ("", r"is empty"),
    ("- a\n- b\n", r"expected a mapping"),
    ("files: [unclosed", r"not valid YAML at line"),
    ("key: {a: b\n  c", r"not valid YAML"),
    ("files: []\nrepositories: []\n", r"files: must not be empty"),
])
def test_bad_values_files(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config({"LAZY_LOADING_FILE": str(path)})
    assert "\n" not in str(info.value)


def test_values_file_credential_missing_field_does_not_echo_secret(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(VALUES_YAML.replace("awsAccessKeyId: AKIAX, ", ""))
    with pytest.raises(ConfigError, match=r"credentials\[0\]\.awsAccessKeyId: is required") as info:
        load_config({"LAZY_LOADING_FILE": str(path)})
    assert SECRET_CANARY not in str(info.value)


@pytest.mark.parametrize(("name", "value", "pattern"), [
    ("LAZY_LOADING_MAX_CONNECTIONS", "0", r"LAZY_LOADING_MAX_CONNECTIONS: must be at least 1 \(got .0.\)"),
    ("LAZY_LOADING_PART_SIZE", "12 parsecs", r"LAZY_LOADING_PART_SIZE: must be a size such as 16MiB"),
    ("LAZY_LOADING_STALL_TIMEOUT", "-1", r"LAZY_LOADING_STALL_TIMEOUT"),
])
def test_bad_settings(name: str, value: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        LazyLoadingSettings.from_environ({name: value})


def test_settings_built_in_code_are_checked_like_the_environment() -> None:
    """A library user hands the handler ``settings=``: the same limits and units apply."""
    from drum_servers.settings import ServerSettings

    with pytest.raises(ConfigError, match=r"LAZY_LOADING_MAX_CONNECTIONS: must be at least 1"):
        LazyLoadingSettings(max_connections=0)
    with pytest.raises(ConfigError, match=r"LAZY_LOADING_CACHE_DIR: must be an absolute path"):
        LazyLoadingSettings(cache_dir=Path("relative"))
    assert LazyLoadingSettings(part_size="8MiB").part_size == 8 * 1024 * 1024  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"MAX_WORKERS: must be at most 64"):
        ServerSettings(workers=65)


def test_settings_parse_sizes_and_roots() -> None:
    s = LazyLoadingSettings.from_environ({
        "LAZY_LOADING_PART_SIZE": "8MiB", "LAZY_LOADING_ALLOWED_ROOTS": f"/a{os.pathsep}/b",
        "LAZY_LOADING_TIMEOUT": "30"})
    assert s.part_size == 8 * 1024 * 1024
    assert s.allowed_roots == (Path("/a"), Path("/b"))
    assert s.timeout == 30


CLI_CASES = ["malformed json", "unknown repositoryId", "dot-dot escape", "case-variant key",
             "missing credential env", "credential missing a field", "duplicate target",
             "credentials in endpoint"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_is_one_line_exit_1_and_no_network(
    case: str, tmp_path: Path, s3: Any
) -> None:
    import subprocess
    import sys

    env = dict(next(c[1] for c in CASES if c[0] == case))
    data = env["MLOPS_LAZY_LOADING_DATA"]
    if data.startswith("{") and "endpointUrl" in data and "127.0.0.1:1" in data:
        env["MLOPS_LAZY_LOADING_DATA"] = data.replace("http://127.0.0.1:1", s3.url)
    result = subprocess.run(
        [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(tmp_path)],
        env={**env, "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert SECRET_CANARY not in result.stderr + result.stdout
    assert s3.faults.ledger.requests == [], "nothing is sent for a bad config"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["", "- a\n", "files: [unclosed"])
def test_cli_bad_values_file(text: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    values = tmp_path / "values.yaml"
    values.write_text(text)
    code = tmp_path / "code"
    code.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "drum_servers.cli", "download", "--code-dir", str(code),
         "--lazy-loading-file", str(values)],
        env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(values) in result.stderr
    assert list(code.iterdir()) == []


def test_every_setting_is_in_the_readme_table() -> None:
    from drum_servers.settings import _ENV_NAMES
    from lazy_loading.settings import setting_names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = setting_names() + list(_ENV_NAMES.values())
    missing = [n for n in names if f"| `{n}` |" not in readme]
    assert missing == []


def test_drum_style_null_verify_certificate_and_a_token_with_a_trailing_newline_are_accepted(
    tmp_path: Path,
) -> None:
    env = _env(_data(repositories=[_repo(verifyCertificate=None, endpointUrl="http://h:9")]),
               cred={**CRED, "awsSessionToken": TOKEN_CANARY + "\n"})
    config = LazyLoadingHandler(code_dir=tmp_path, environ=env).load_config()
    assert config.data.repositories[0].verify_certificate is True
    token = config.credentials["c1"].aws_session_token
    assert token is not None and token.get_secret_value() == TOKEN_CANARY


@pytest.mark.parametrize("text", [
    "files: []\nfiles: []\n",
    "[" * 100_000 + "]" * 100_000,
])
def test_values_file_duplicates_and_deep_nesting_are_one_line(text: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(text)
    with pytest.raises(ConfigError) as info:
        LazyLoadingHandler(code_dir=tmp_path, environ={}, values_file=values).load_config()
    assert "\n" not in str(info.value)
    assert "duplicate key 'files'" in str(info.value) or "nested too deeply" in str(info.value)


def test_credentials_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "credential"
    secret_file.write_text(json.dumps(CRED) + "\n")
    env = _env(_data(), cred=None)
    env["MLOPS_REPOSITORY_SECRET_C1_FILE"] = str(secret_file)
    config = LazyLoadingHandler(code_dir=tmp_path, environ=env).load_config()
    assert config.credentials["c1"].aws_secret_access_key.get_secret_value() == SECRET_CANARY
    with pytest.raises(ConfigError, match=r"both MLOPS_REPOSITORY_SECRET_C1 and "
                                          r"MLOPS_REPOSITORY_SECRET_C1_FILE are set"):
        LazyLoadingHandler(code_dir=tmp_path, environ={**env, **_env(_data())}).load_config()
    env["MLOPS_REPOSITORY_SECRET_C1_FILE"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"MLOPS_REPOSITORY_SECRET_C1_FILE: cannot read "
                                          r".*missing \(No such file or directory\)"):
        LazyLoadingHandler(code_dir=tmp_path, environ=env).load_config()


@pytest.mark.parametrize("read_as", ["drum", "portable"])
def test_credential_ids_with_dashes_and_dots_use_drums_variable_name(
    tmp_path: Path, read_as: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(VALUES_YAML.replace("cred1", "cred-1.x"))
    env: dict[str, str] = {}
    LazyLoadingHandler.setup_environment_variables_from_values_file(path, env)
    assert "MLOPS_REPOSITORY_SECRET_CRED-1.X" in env, "the name DRUM writes and reads"
    if read_as == "portable":  # a shell cannot export DRUM's name; this one it can
        env["MLOPS_REPOSITORY_SECRET_CRED_1_X"] = env.pop("MLOPS_REPOSITORY_SECRET_CRED-1.X")
    config = load_config(env)
    assert config is not None
    assert config.credentials["cred-1.x"].aws_access_key_id == "AKIAX"
    with pytest.raises(ConfigError, match=r"MLOPS_REPOSITORY_SECRET_CRED-1\.X is not set \(or "
                                          r"MLOPS_REPOSITORY_SECRET_CRED_1_X\)"):
        load_config({"MLOPS_LAZY_LOADING_DATA": env["MLOPS_LAZY_LOADING_DATA"]})


def test_a_name_registered_after_a_check_is_no_longer_reported() -> None:
    """The servers register their own LAZY_LOADING_* names; a check made before that (and
    remembered) must not go on calling them unknown."""
    from lazy_loading import environ

    env = {"LAZY_LOADING_LATE_ADDITION": "1", "PATH": "/usr/bin"}
    assert environ.unknown_names(env) == [
        "LAZY_LOADING_LATE_ADDITION is not a variable lazy loading reads (see the README's "
        "configuration table)"]
    environ.register_known(["LAZY_LOADING_LATE_ADDITION"])
    try:
        assert environ.unknown_names(env) == []
    finally:
        environ._known.discard("LAZY_LOADING_LATE_ADDITION")
        environ._unknown_names.cache_clear()
