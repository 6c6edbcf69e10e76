"""Fast, verified, fork-safe download of DRUM lazy-loading artifacts from S3."""

from .config import LazyLoadingConfig, load_config
from .engine import FileResult
from .errors import ConfigError, DownloadError, LazyLoadingError
from .handler import LazyLoadingHandler
from .progress import DownloadState, ProgressSnapshot
from .settings import LazyLoadingSettings

__all__ = [
    "ConfigError",
    "DownloadError",
    "DownloadState",
    "FileResult",
    "LazyLoadingConfig",
    "LazyLoadingError",
    "LazyLoadingHandler",
    "LazyLoadingSettings",
    "ProgressSnapshot",
    "load_config",
]
