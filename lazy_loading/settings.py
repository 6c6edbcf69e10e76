"""Tuning knobs read from ``LAZY_LOADING_*`` environment variables, validated in one place."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import Check, Field, boolean, check_settings, integer, number, optional, path

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


@dataclass(frozen=True)
class LazyLoadingSettings:
    """Engine settings; each field maps to ``LAZY_LOADING_<FIELD>`` (see README table)."""

    max_connections: int = 32
    part_size: int | None = None
    stall_timeout: float = 15.0
    min_rate: int = 1024
    timeout: float | None = None
    max_attempts: int = 8
    allowed_roots: tuple[Path, ...] = ()
    progress_interval: float = 5.0
    verify_checksums: bool = True
    fsync: bool = False
    scrub_env: bool = True
    replace_model_code: bool = False
    cache_dir: Path | None = None
    cache_max_bytes: int | None = None

    def __post_init__(self) -> None:
        check_settings(self, _FIELDS, lambda name: f"LAZY_LOADING_{name.upper()}")

    @property
    def rate_window(self) -> float:
        """The window ``min_rate`` is measured over: twice the stall timeout."""
        return 2 * self.stall_timeout

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LazyLoadingSettings:
        """Build settings from ``LAZY_LOADING_*`` variables; unset or empty ones keep defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in _FIELDS:
            raw = env.get(f"LAZY_LOADING_{field.name.upper()}", "").strip()
            if raw:
                values[field.name] = raw
        return cls(**values)


def setting_names() -> list[str]:
    """Every ``LAZY_LOADING_*`` variable the engine reads."""
    return [f"LAZY_LOADING_{field.name.upper()}" for field in _FIELDS]


def byte_size(ge: int | None = None, le: int | None = None,
              example: str = "16MiB or 16777216") -> Check:
    """A number of bytes, or its text: ``16777216``, ``16M`` or ``16MiB``."""
    bounded = integer(ge=ge, le=le)

    def check(value: object) -> int:
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ValueError:
                raise ValueError(f"must be a size such as {example}") from None
        return bounded(value)  # type: ignore[no-any-return]
    return check


def _auto_or(inner: Check) -> Check:
    def check(value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        return inner(value)
    return check


def _absolute_dir(value: object) -> Path:
    absolute = path(value)
    if not absolute.is_absolute():
        raise ValueError("must be an absolute path (a volume every pod of the node mounts)")
    return absolute


def _roots(value: object) -> tuple[Path, ...]:
    if isinstance(value, str):
        return tuple(Path(p) for p in value.split(os.pathsep) if p.strip())
    if isinstance(value, (list, tuple)):
        return tuple(path(p) for p in value)
    raise ValueError("must be paths separated by ':'")


_FIELDS = (
    Field("max_connections", integer(ge=1, le=256)),
    Field("part_size", optional(_auto_or(byte_size(ge=1 * MiB, le=5 * 1024 * MiB)))),
    Field("stall_timeout", number(gt=0, le=3600)),
    Field("min_rate", byte_size(ge=0)),
    Field("timeout", optional(_auto_or(number(gt=0)))),
    Field("max_attempts", integer(ge=1, le=100)),
    Field("allowed_roots", _roots),
    Field("progress_interval", number(gt=0)),
    Field("verify_checksums", boolean),
    Field("fsync", boolean),
    Field("scrub_env", boolean),
    Field("replace_model_code", boolean),
    Field("cache_dir", optional(_absolute_dir)),
    Field("cache_max_bytes", optional(byte_size(ge=0))),
)
