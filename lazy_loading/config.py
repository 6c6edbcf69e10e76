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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .errors import ConfigError
from .redact import register_secret

DATA_ENV = "MLOPS_LAZY_LOADING_DATA"
SECRET_ENV_PREFIX = "MLOPS_REPOSITORY_SECRET_"
FILE_SUFFIX = "_FILE"
VALUES_FILE_ENV = "LAZY_LOADING_FILE"

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _normalized(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


class _Model(BaseModel):
    """Shared model behaviour: camelCase or snake_case, unknown keys ignored, no input echo."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_case_variants(cls, data: Any) -> Any:
        """A key like ``endpointURL`` is a typo of a known key, not an unknown extension.

        DRUM ignores it and silently falls back to AWS; we refuse it and name the right spelling.
        """
        if not isinstance(data, Mapping):
            return data
        known: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            spelled: str = field.alias or name
            known[name] = spelled
            known[spelled] = spelled
        by_normal = {_normalized(k): v for k, v in known.items()}
        for key in data:
            if not isinstance(key, str) or key in known:
                continue
            alias = by_normal.get(_normalized(key))
            if alias is not None:
                raise ValueError(f"unknown key {key!r}; did you mean {alias!r}?")
        return data


def _no_control_characters(value: str) -> str:
    """A newline or NUL in a name splits log lines or truncates paths: refuse it."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (newline, tab, NUL, ...)")
    return value


class LazyLoadingFile(_Model):
    """One artifact: where it lives in the repository and where the model expects it."""

    remote_path: str = Field(min_length=1)
    local_path: str = Field(min_length=1)
    repository_id: str = Field(min_length=1)
    sha256: str | None = None
    size: int | None = Field(None, ge=0, strict=True)

    @field_validator("remote_path")
    @classmethod
    def _check_remote_path(cls, value: str) -> str:
        _no_control_characters(value)
        if value.endswith("/"):
            raise ValueError("ends with '/', which names a folder marker, not an object; name "
                             "each file of the folder")
        return value

    @field_validator("local_path")
    @classmethod
    def _check_local_path(cls, value: str) -> str:
        _no_control_characters(value)
        if value.endswith(("/", "/.", "/..")) or value in (".", ".."):
            raise ValueError("names a directory; name the file, e.g. artifacts/model.bin")
        return value

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value):
            raise ValueError("must be 64 hexadecimal characters (a SHA-256 digest)")
        return value.lower() if value else value


class LazyLoadingRepository(_Model):
    """An S3(-compatible) bucket and the credential used to read it."""

    repository_id: str = Field(min_length=1)
    bucket_name: str = Field(min_length=1)
    credential_id: str = Field(min_length=1)
    endpoint_url: str | None = None
    verify_certificate: bool = True
    ca_bundle: str | None = None
    region: str | None = None

    @field_validator("verify_certificate", mode="before")
    @classmethod
    def _null_verifies(cls, value: Any) -> Any:
        # DRUM's own values-file helper writes null for every repository without an endpoint.
        return True if value is None else value

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
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

    @field_validator("bucket_name")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if not _BUCKET.match(value):
            raise ValueError("must be a bucket name (letters, digits, '.', '-', '_'; no '/'): "
                             "put the key prefix in each file's remotePath")
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str | None) -> str | None:
        if value is not None and not _REGION.match(value):
            raise ValueError("must be a region name such as us-east-1")
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _no_control_characters(value)
        if not os.path.isfile(value):
            what = "is a directory" if os.path.isdir(value) else "does not exist"
            raise ValueError(f"{value} {what}; name a PEM file of CA certificates")
        return value


class LazyLoadingData(_Model):
    """The whole ``MLOPS_LAZY_LOADING_DATA`` document."""

    files: list[LazyLoadingFile] = Field(min_length=1)
    repositories: list[LazyLoadingRepository] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> LazyLoadingData:
        seen: dict[str, int] = {}
        for index, repo in enumerate(self.repositories):
            if repo.repository_id in seen:
                raise ValueError(
                    f"repositories[{index}].repositoryId {repo.repository_id!r} duplicates "
                    f"repositories[{seen[repo.repository_id]}]; ids must be unique"
                )
            seen[repo.repository_id] = index
        for index, item in enumerate(self.files):
            if item.repository_id not in seen:
                raise ValueError(
                    f"files[{index}].repositoryId {item.repository_id!r} names no repository; "
                    f"known: {', '.join(sorted(seen))}"
                )
        return self

    def repository(self, repository_id: str) -> LazyLoadingRepository:
        return next(r for r in self.repositories if r.repository_id == repository_id)


class S3Credentials(_Model):
    """Static S3 credentials; secrets are ``SecretStr`` so no repr, log or error shows them."""

    credential_type: Literal["s3"]
    aws_access_key_id: str = Field(min_length=1)
    aws_secret_access_key: SecretStr = Field(min_length=1)
    aws_session_token: SecretStr | None = None
    region: str | None = Field(None, validation_alias=AliasChoices("region", "regionName"))

    @field_validator("aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                     mode="before")
    @classmethod
    def _clean_secret(cls, value: Any) -> Any:
        """Strip the trailing newline of a value read from a file; refuse other control
        characters, which would end up in a header (the value itself is never shown)."""
        if isinstance(value, str):
            value = value.strip()
            if _CONTROL.search(value):
                raise ValueError("contains control characters (newline, tab, NUL, ...)")
        return value

    @field_validator("aws_session_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _register_secrets(self) -> S3Credentials:
        register_secret(self.aws_secret_access_key.get_secret_value())
        if self.aws_session_token is not None:
            register_secret(self.aws_session_token.get_secret_value())
        return self

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


class _ValuesCredential(S3Credentials):
    id: str = Field(min_length=1)


class _ValuesFile(LazyLoadingData):
    credentials: list[_ValuesCredential] = Field(default_factory=list)


class LazyLoadingConfig(BaseModel):
    """A validated configuration: the data plus one credential per credential id."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    data: LazyLoadingData
    credentials: dict[str, S3Credentials]
    source: str

    def credentials_for(self, repository: LazyLoadingRepository) -> S3Credentials:
        return self.credentials[repository.credential_id]


def secret_env_name(credential_id: str) -> str:
    """``MLOPS_REPOSITORY_SECRET_<ID>`` as DRUM writes and reads it: the id upper-cased."""
    return SECRET_ENV_PREFIX + credential_id.upper()


def secret_env_names(credential_id: str) -> list[str]:
    """DRUM's name, then one a shell can export (every non-alphanumeric turned into ``_``)."""
    portable = SECRET_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", credential_id.upper())
    return list(dict.fromkeys([secret_env_name(credential_id), portable]))


_FRIENDLY = {
    "missing": "is required",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
    "literal_error": "must be 's3' (the only supported credentialType)",
}


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line naming the source, the field path and what is expected; never the input value."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    loc = _loc(first["loc"])
    msg = _FRIENDLY.get(first["type"], first["msg"].removeprefix("Value error, "))
    where = f"{source}: {loc}: " if loc else f"{source}: "
    more = f" (+{len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}{msg}{more}"


def _validate(model: type[_Model], source: str, payload: object) -> Any:
    if not isinstance(payload, Mapping):
        raise ConfigError(f"{source}: expected a mapping with 'files' and 'repositories'")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


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
        credentials[cred_id] = _validate(S3Credentials, name, payload)
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
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror})") from None
    import yaml

    try:
        payload = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader: no arbitrary objects
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
    values: _ValuesFile = _validate(_ValuesFile, source, payload)
    credentials: dict[str, S3Credentials] = {}
    for entry in values.credentials:
        credentials[entry.id] = S3Credentials.model_validate(entry.model_dump())
    data = LazyLoadingData.model_validate(values.model_dump(exclude={"credentials"}))
    return data, credentials


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
        data, known, source = _validate(LazyLoadingData, DATA_ENV, payload), {}, DATA_ENV
    else:
        return None
    credentials = _credentials_from_env(data, env, known, scrub_env)
    return LazyLoadingConfig(data=data, credentials=credentials, source=source)
