"""Tuning knobs read from ``LAZY_LOADING_*`` environment variables, validated in one place."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

MiB = 1024 * 1024

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}


def parse_size(value: str | int) -> int:
    """Parse ``16777216``, ``16M``, ``16MiB`` or ``16mb`` into bytes (binary units)."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"expected a size such as 16MiB or 16777216, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


class LazyLoadingSettings(BaseModel):
    """Engine settings; each field maps to ``LAZY_LOADING_<FIELD>`` (see README table)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: int = Field(16, ge=1, le=256)
    part_size: int | None = Field(None, ge=1 * MiB, le=5 * 1024 * MiB)
    stall_timeout: float = Field(15.0, gt=0, le=3600)
    min_rate: int = Field(1024, ge=0)
    timeout: float | None = Field(None, gt=0)
    max_attempts: int = Field(8, ge=1, le=100)
    allowed_roots: tuple[Path, ...] = ()
    progress_interval: float = Field(5.0, gt=0)
    verify_checksums: bool = True
    fsync: bool = False
    scrub_env: bool = True
    replace_model_code: bool = False
    cache_dir: Path | None = None
    cache_max_bytes: int | None = Field(None, ge=0)

    @field_validator("part_size", mode="before")
    @classmethod
    def _parse_part_size(cls, value: object) -> object:
        if isinstance(value, str):
            return None if value.strip().lower() == "auto" else parse_size(value)
        return value

    @field_validator("min_rate", "cache_max_bytes", mode="before")
    @classmethod
    def _parse_min_rate(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("timeout", mode="before")
    @classmethod
    def _auto_timeout(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @property
    def rate_window(self) -> float:
        """The window ``min_rate`` is measured over: twice the stall timeout."""
        return 2 * self.stall_timeout

    @field_validator("cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path (a volume every pod of the node mounts)")
        return value

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p) for p in value.split(os.pathsep) if p.strip())
        return value

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LazyLoadingSettings:
        """Build settings from ``LAZY_LOADING_*`` variables; unset or empty ones keep defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(f"LAZY_LOADING_{name.upper()}", "").strip()
            if raw:
                values[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            raise ConfigError(
                f"LAZY_LOADING_{field.upper()}: {err['msg']} (got {values.get(field)!r})"
            ) from None
