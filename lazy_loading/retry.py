"""Retrying one request: full-jitter backoff, the store's Retry-After, and a cancel switch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from .progress import ProgressTracker
from .s3io import Cancelled, TransientFailure
from .settings import LazyLoadingSettings

logger = logging.getLogger("lazy_loading")

T = TypeVar("T")

_BACKOFF_BASE = 0.2
_BACKOFF_CAP = 8.0
_RETRY_AFTER_CAP = 60.0
_CONNECT_ATTEMPTS = 3


def backoff(attempt: int) -> float:
    """Full-jitter exponential backoff (AWS architecture blog), attempt counted from 1.
    ``random`` is imported on the first retry: most runs have none, and every start paid
    about a millisecond for it."""
    import random

    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** attempt))


class Retrier:
    """Runs a blocking request again on transient failures, up to the configured attempts
    (three when the endpoint refuses connections), counting every retry in the progress."""

    def __init__(self, settings: LazyLoadingSettings, tracker: ProgressTracker) -> None:
        self._settings = settings
        self._tracker = tracker

    def call(self, call: Callable[[], T], cancel: threading.Event,
             on_retry: Callable[[], None] | None = None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except TransientFailure as exc:
                if cancel.is_set():  # the run gave up (and may have cut this body): not a cause
                    raise Cancelled() from None
                limit = _CONNECT_ATTEMPTS if exc.connect_failure else self._settings.max_attempts
                if attempt >= limit:
                    raise
                delay = backoff(attempt)
                if exc.retry_after is not None:  # the store knows best when to come back
                    delay = max(delay, min(exc.retry_after, _RETRY_AFTER_CAP))
                self._tracker.retry()
                logger.warning("%s (attempt %d/%d), retrying in %.1f s",
                               exc.message, attempt, limit, delay)
                if on_retry is not None:
                    on_retry()
                if cancel.wait(delay):
                    raise Cancelled() from None
