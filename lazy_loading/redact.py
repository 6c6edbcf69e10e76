"""Keep secrets out of every log record, including botocore's DEBUG request dumps.

botocore at DEBUG prints request headers (``X-Amz-Security-Token``, ``Authorization``); users
turn DEBUG on when something breaks, which is exactly when logs get pasted into tickets. A record
factory sees every record from every logger, so it covers libraries we do not control.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

_MASK = "***"
_PATTERNS = [
    re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*b?['\"]?)[^'\",\s}]+", re.IGNORECASE),
    re.compile(r"(Signature=)[0-9a-f]{16,}", re.IGNORECASE),
    re.compile(r"(X-Amz-Signature=)[0-9a-f]{16,}", re.IGNORECASE),
    re.compile(r"(aws_secret_access_key['\"]?\s*[:=]\s*['\"]?)[^'\",\s}]+", re.IGNORECASE),
    re.compile(r"(awsSecretAccessKey['\"]?\s*[:=]\s*['\"]?)[^'\",\s}]+"),
    re.compile(r"(awsSessionToken['\"]?\s*[:=]\s*['\"]?)[^'\",\s}]+"),
]

# What every match of a pattern above contains: most records hold none of it, and one search
# then rules all six out (they took 7.5 µs of a record's 19).
_ANY_PATTERN = re.compile(
    "X-Amz-Security-Token|Signature=|aws_secret_access_key|awsSecretAccessKey|awsSessionToken",
    re.IGNORECASE)

_secrets: set[str] = set()
_FORMATTER = logging.Formatter()
_lock = threading.Lock()
_installed = False


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it would appear in a log record from now on, also in the forms
    a traceback or a ``repr`` would show it (``\\n`` escaped, JSON-escaped)."""
    if len(value) >= 4:
        forms = {value, repr(value)[1:-1], json.dumps(value)[1:-1]}
        with _lock:
            _secrets.update(f for f in forms if len(f) >= 4)
    install()


class Secret:
    """A credential value that no ``repr``, ``str`` or log record shows; it is registered for
    redaction as soon as it exists."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register_secret(value)

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    if _ANY_PATTERN.search(text):
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + _MASK, text)
    return text


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def one_line(text: str, limit: int = 120) -> str:
    """Text someone else chose (a store's error, a client's charset), made safe for one log
    line or response: secrets masked, no control characters (a newline would forge a log
    line), bounded."""
    text = _UNPRINTABLE.sub(" ", redact(str(text))).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def install() -> None:
    """Wrap the log record factory once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        # A traceback shows exception messages and reprs of values: format it now and drop the
        # live exception, so every formatter (JSON ones too) prints only the redacted text.
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)
