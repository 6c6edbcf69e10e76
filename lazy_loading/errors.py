"""Exception types. Every message is one line a user can act on and never contains a secret."""

from __future__ import annotations

import re


class LazyLoadingError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(LazyLoadingError, ValueError):
    """The lazy-loading configuration is invalid; raised before any network call."""


class DownloadError(LazyLoadingError):
    """One or more artifacts could not be fetched, verified or published.

    ``failures`` maps each failed target path to its one-line reason, so callers (and the
    message) can list every failed file rather than only the first one.
    """

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        self.failures: dict[str, str] = dict(failures or {})
        if self.failures:
            message = f"{message}: {_grouped(self.failures)}"
        super().__init__(message)


# "s3://bucket/key at <endpoint>: <cause>": the cause alone is what repeats across files.
_WHERE = re.compile(r"^s3://\S* at (?:AWS S3|\S+): ")


def _grouped(failures: dict[str, str]) -> str:
    """Each distinct cause once, with how many files it hit and the first of them: 58 files
    refused for the same credentials make one short line, not 58 copies of it."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for path, reason in failures.items():
        match = _WHERE.match(reason)
        cause = reason[match.end():] if match else reason
        groups.setdefault(cause, []).append((path, reason))
    parts = []
    for cause, hits in groups.items():
        path, reason = hits[0]
        if len(hits) == 1:
            parts.append(f"{path}: {reason}")
        else:
            where = reason[: len(reason) - len(cause) - 2] if reason != cause else path
            parts.append(f"{len(hits)} files: {cause} (first: {path}, {where})")
    return "; ".join(parts)
