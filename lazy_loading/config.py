"""DRUM's lazy-loading contract: the JSON/YAML schema, credentials, and one-line validation errors.

Compatible with DRUM 1.18 (camelCase or snake_case keys, unknown keys ignored) but stricter where
DRUM is silently wrong: case-variant keys, unknown repositories, non-http endpoints, and secrets
echoed in error messages are all rejected or hidden here.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from . import schema
from .errors import ConfigError
from .redact import Secret
from .schema import Field, Invalid, camel_fields, chain, integer, list_of, optional, record, text

DATA_ENV = "MLOPS_LAZY_LOADING_DATA"
SECRET_ENV_PREFIX = "MLOPS_REPOSITORY_SECRET_"
FILE_SUFFIX = "_FILE"
VALUES_FILE_ENV = "LAZY_LOADING_FILE"

T = TypeVar("T")


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class LazyLoadingFile:
    """One artifact: where it lives in the repository and where the model expects it."""

    remote_path: str
    local_path: str
    repository_id: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class LazyLoadingRepository:
    """An S3(-compatible) bucket and the credential used to read it."""

    repository_id: str
    bucket_name: str
    credential_id: str
    endpoint_url: str | None = None
    verify_certificate: bool = True
    ca_bundle: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class LazyLoadingData:
    """The whole ``MLOPS_LAZY_LOADING_DATA`` document."""

    files: tuple[LazyLoadingFile, ...]
    repositories: tuple[LazyLoadingRepository, ...]

    def repository(self, repository_id: str) -> LazyLoadingRepository:
        return next(r for r in self.repositories if r.repository_id == repository_id)

    def to_json(self) -> str:
        """The document with snake_case keys, as DRUM's values-file helper writes it."""
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class S3Credentials:
    """Static S3 credentials; secrets are ``Secret`` so no repr, log or error shows them."""

    credential_type: Literal["s3"]
    aws_access_key_id: str
    aws_secret_access_key: Secret
    aws_session_token: Secret | None = None
    region: str | None = None

    def to_env_json(self) -> str:
        """The ``MLOPS_REPOSITORY_SECRET_<ID>`` JSON DRUM expects (reveals the secret on purpose)."""
        payload: dict[str, str] = {
            "credentialType": self.credential_type,
            "awsAccessKeyId": self.aws_access_key_id,
            "awsSecretAccessKey": self.aws_secret_access_key.get_secret_value(),
        }
        if self.aws_session_token is not None:
            payload["awsSessionToken"] = self.aws_session_token.get_secret_value()
        if self.region:
            payload["region"] = self.region
        return json.dumps(payload)


@dataclass(frozen=True)
class LazyLoadingConfig:
    """A validated configuration: the data plus one credential per credential id."""

    data: LazyLoadingData
    credentials: dict[str, S3Credentials]
    source: str

    def credentials_for(self, repository: LazyLoadingRepository) -> S3Credentials:
        return self.credentials[repository.credential_id]


def _no_control_characters(value: str) -> str:
    """A newline or NUL in a name splits log lines or truncates paths: refuse it."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (newline, tab, NUL, ...)")
    return value


def _remote_path(value: str) -> str:
    _no_control_characters(value)
    if value.endswith("/"):
        raise ValueError("ends with '/', which names a folder marker, not an object; name "
                         "each file of the folder")
    return value


def _local_path(value: str) -> str:
    _no_control_characters(value)
    if value.endswith(("/", "/.", "/..")) or value in (".", ".."):
        raise ValueError("names a directory; name the file, e.g. artifacts/model.bin")
    return value


def _sha256(value: str) -> str:
    if not _HEX64.match(value):
        raise ValueError("must be 64 hexadecimal characters (a SHA-256 digest)")
    return value.lower()


def _verify_certificate(value: Any) -> bool:
    # DRUM's own values-file helper writes null for every repository without an endpoint.
    return True if value is None else schema.boolean(value)


def _endpoint(value: str) -> str:
    _no_control_characters(value)
    parts = urlsplit(value.strip())
    if not value.strip():
        raise ValueError("must not be empty; omit it to use AWS S3")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL such as https://s3.example.com")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 and parts.netloc.rpartition("]")[2].count(":"):
        raise ValueError("has an invalid port; use a number from 1 to 65535")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials; use MLOPS_REPOSITORY_SECRET_<ID>")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query string or fragment")
    return value.strip()


def _bucket(value: str) -> str:
    if not _BUCKET.match(value):
        raise ValueError("must be a bucket name (letters, digits, '.', '-', '_'; no '/'): "
                         "put the key prefix in each file's remotePath")
    return value


def _region(value: str) -> str:
    if not _REGION.match(value):
        raise ValueError("must be a region name such as us-east-1")
    return value


def _ca_bundle(value: str) -> str:
    _no_control_characters(value)
    if not os.path.isfile(value):
        what = "is a directory" if os.path.isdir(value) else "does not exist"
        raise ValueError(f"{value} {what}; name a PEM file of CA certificates")
    return value


def _secret_text(value: Any) -> str:
    """Strip the trailing newline of a value read from a file; refuse other control
    characters, which would end up in a header (the value itself is never shown)."""
    cleaned: str = text(min_length=1)(value).strip()
    if _CONTROL.search(cleaned):
        raise ValueError("contains control characters (newline, tab, NUL, ...)")
    if not cleaned:
        raise ValueError("must not be empty")
    return cleaned


def _session_token(value: Any) -> Secret | None:
    return None if isinstance(value, str) and not value.strip() else Secret(_secret_text(value))


def _credential_type(value: Any) -> str:
    if value != "s3":
        raise ValueError("must be 's3' (the only supported credentialType)")
    return "s3"


_FILE_FIELDS = camel_fields(
    Field("remote_path", chain(text(min_length=1), _remote_path)),
    Field("local_path", chain(text(min_length=1), _local_path)),
    Field("repository_id", text(min_length=1)),
    Field("sha256", optional(chain(text(), _sha256)), None),
    Field("size", optional(integer(ge=0, strict=True)), None),
)
_REPOSITORY_FIELDS = camel_fields(
    Field("repository_id", text(min_length=1)),
    Field("bucket_name", chain(text(min_length=1), _bucket)),
    Field("credential_id", text(min_length=1)),
    Field("endpoint_url", optional(chain(text(), _endpoint)), None),
    Field("verify_certificate", _verify_certificate, True),
    Field("ca_bundle", optional(chain(text(), _ca_bundle)), None),
    Field("region", optional(chain(text(), _region)), None),
)
_CREDENTIAL_FIELDS = camel_fields(
    Field("credential_type", _credential_type),
    Field("aws_access_key_id", _secret_text),
    Field("aws_secret_access_key", chain(_secret_text, Secret)),
    Field("aws_session_token", optional(_session_token), None),
    Field("region", optional(text()), None, also=("regionName",)),
)
_VALUES_CREDENTIAL_FIELDS = (*_CREDENTIAL_FIELDS, Field("id", text(min_length=1)))


def _file(mapping: Mapping[Any, Any]) -> LazyLoadingFile:
    return LazyLoadingFile(**schema.read(_FILE_FIELDS, mapping))


def _repository(mapping: Mapping[Any, Any]) -> LazyLoadingRepository:
    return LazyLoadingRepository(**schema.read(_REPOSITORY_FIELDS, mapping))


def _credentials(mapping: Mapping[Any, Any]) -> S3Credentials:
    return S3Credentials(**schema.read(_CREDENTIAL_FIELDS, mapping))


def _values_credential(mapping: Mapping[Any, Any]) -> tuple[str, S3Credentials]:
    values = schema.read(_VALUES_CREDENTIAL_FIELDS, mapping)
    return values.pop("id"), S3Credentials(**values)


_DATA_FIELDS = (
    Field("files", chain(list_of(record(_file), min_length=1), tuple)),
    Field("repositories", chain(list_of(record(_repository), min_length=1), tuple)),
)
_VALUES_FIELDS = (
    *_DATA_FIELDS,
    Field("credentials", list_of(record(_values_credential)), []),
)


def _check_references(data: LazyLoadingData) -> LazyLoadingData:
    seen: dict[str, int] = {}
    for index, repo in enumerate(data.repositories):
        if repo.repository_id in seen:
            raise ValueError(
                f"repositories[{index}].repositoryId {repo.repository_id!r} duplicates "
                f"repositories[{seen[repo.repository_id]}]; ids must be unique"
            )
        seen[repo.repository_id] = index
    for index, item in enumerate(data.files):
        if item.repository_id not in seen:
            raise ValueError(
                f"files[{index}].repositoryId {item.repository_id!r} names no repository; "
                f"known: {', '.join(sorted(seen))}"
            )
    return data


def _data(mapping: Mapping[Any, Any]) -> LazyLoadingData:
    return _check_references(LazyLoadingData(**schema.read(_DATA_FIELDS, mapping)))


def _values(mapping: Mapping[Any, Any]) -> tuple[LazyLoadingData, dict[str, S3Credentials]]:
    values = schema.read(_VALUES_FIELDS, mapping)
    credentials = dict(values.pop("credentials"))
    return _check_references(LazyLoadingData(**values)), credentials


def secret_env_name(credential_id: str) -> str:
    """``MLOPS_REPOSITORY_SECRET_<ID>`` as DRUM writes and reads it: the id upper-cased."""
    return SECRET_ENV_PREFIX + credential_id.upper()


def secret_env_names(credential_id: str) -> list[str]:
    """DRUM's name, then one a shell can export (every non-alphanumeric turned into ``_``)."""
    portable = SECRET_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", credential_id.upper())
    return list(dict.fromkeys([secret_env_name(credential_id), portable]))


def _validate(build: Callable[[Mapping[Any, Any]], T], source: str, payload: object) -> T:
    if not isinstance(payload, Mapping):
        raise ConfigError(f"{source}: expected a mapping with 'files' and 'repositories'")
    try:
        return build(payload)
    except Invalid as exc:
        raise ConfigError(schema.one_line(source, exc)) from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _parse_json(source: str, text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a lazy-loading document") from None


# Credentials read from (and scrubbed out of) ``os.environ`` stay here, in process memory: forked
# gunicorn workers inherit them, while model code and subprocesses no longer see them.
_scrubbed: dict[str, str] = {}


def _credentials_from_env(
    data: LazyLoadingData, environ: Mapping[str, str], known: Mapping[str, S3Credentials],
    scrub: bool,
) -> dict[str, S3Credentials]:
    credentials = dict(known)
    from_os = environ is os.environ
    for index, repo in enumerate(data.repositories):
        cred_id = repo.credential_id
        if cred_id in credentials:
            continue
        names = secret_env_names(cred_id)
        name = next((n for n in names if environ.get(n) or (from_os and n in _scrubbed)), None)
        file_name = next((n + FILE_SUFFIX for n in names if environ.get(n + FILE_SUFFIX)), None)
        if name is not None and file_name is not None:
            raise ConfigError(f"both {name} and {file_name} are set; set only one")
        if file_name is not None:
            name, raw = file_name, _read_secret_file(file_name, environ[file_name])
        elif name is None:
            either = f"{names[0]} is not set" + (f" (or {names[1]})" if len(names) > 1 else "")
            raise ConfigError(
                f"{either} (credential {cred_id!r} of repositories[{index}]); set it "
                'to JSON {"credentialType": "s3", "awsAccessKeyId": ..., "awsSecretAccessKey": ...}'
                f", or {names[0]}{FILE_SUFFIX} to a file holding that JSON"
            )
        else:
            if from_os and scrub and name in os.environ:
                _scrubbed[name] = os.environ.pop(name)
            raw = environ[name] if name in environ else _scrubbed[name]
        payload = _parse_json(name, raw)
        if not isinstance(payload, Mapping):
            raise ConfigError(f"{name}: expected a JSON object with credentialType and keys")
        credentials[cred_id] = _validate(_credentials, name, payload)
    return credentials


@functools.cache
def _unique_key_loader() -> type[Any]:
    """PyYAML's safe loader, refusing a key given twice (it would keep the last silently).
    Built on first use: most starts read JSON, and PyYAML costs ~10 ms to import."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False
                              ) -> dict[Any, Any]:
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            for index, key in enumerate(keys):
                if key in keys[:index]:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", node.value[index][0].start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


_SECRET_FILE_LIMIT = 64 * 1024


def _read_secret_file(variable: str, path: str) -> str:
    """A credential from a file, as Kubernetes mounts a Secret: unlike an environment variable
    it is not in ``/proc/<pid>/environ`` of every process that inherits the environment."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path} ({exc.strerror})") from None
    if len(raw) > _SECRET_FILE_LIMIT:
        raise ConfigError(f"{variable}: {path} is larger than a credential can be")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: {path} is not UTF-8 text") from None


def load_values_file(path: str | os.PathLike[str]) -> tuple[LazyLoadingData, dict[str, S3Credentials]]:
    """Read DRUM's values YAML (``files``, ``repositories``, ``credentials``)."""
    source = f"lazy loading file {os.fspath(path)}"
    try:
        content = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror})") from None
    import yaml

    try:
        payload = yaml.load(content, Loader=_unique_key_loader())  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", "") or "")
        problem = f": {problem}" if problem.startswith("duplicate") else ""
        raise ConfigError(f"{source}: not valid YAML{where}{problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a lazy-loading document") from None
    if payload is None:
        raise ConfigError(f"{source}: is empty; expected 'files', 'repositories', 'credentials'")
    return _validate(_values, source, payload)


def load_config(
    environ: Mapping[str, str] | None = None, values_file: str | os.PathLike[str] | None = None,
    scrub_env: bool = False,
) -> LazyLoadingConfig | None:
    """Load and validate the configuration, or return ``None`` when lazy loading is not set up.

    A values file (argument or ``LAZY_LOADING_FILE``) wins over ``MLOPS_LAZY_LOADING_DATA``;
    credentials missing from the file are looked up in the environment. With ``scrub_env``,
    credential variables read from ``os.environ`` are removed from it (kept in memory).
    """
    env = os.environ if environ is None else environ
    values_file = values_file or env.get(VALUES_FILE_ENV) or None
    if values_file is not None:
        data, known = load_values_file(values_file)
        source = f"lazy loading file {os.fspath(values_file)}"
    elif env.get(DATA_ENV, "").strip():
        payload = _parse_json(DATA_ENV, env[DATA_ENV])
        data, known, source = _validate(_data, DATA_ENV, payload), {}, DATA_ENV
    else:
        return None
    credentials = _credentials_from_env(data, env, known, scrub_env)
    return LazyLoadingConfig(data=data, credentials=credentials, source=source)
