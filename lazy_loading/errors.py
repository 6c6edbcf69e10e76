"""Exception types. Every message is one line a user can act on and never contains a secret."""

from __future__ import annotations


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
            details = "; ".join(f"{path}: {reason}" for path, reason in self.failures.items())
            message = f"{message}: {details}"
        super().__init__(message)
