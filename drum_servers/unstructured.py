"""DRUM's unstructured prediction contract, independent of the web framework."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_TEXT_TYPES = ("application/json", "application/xml", "application/x-www-form-urlencoded")


def parse_content_type(header: str | None) -> tuple[str, str | None]:
    """``text/plain; charset=latin-1`` -> ``("text/plain", "latin-1")``."""
    if not header:
        return "application/octet-stream", None
    mimetype, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip().strip('"')
    return mimetype.strip().lower() or "application/octet-stream", charset


def decode_body(body: bytes, mimetype: str, charset: str | None) -> str | bytes:
    """Text and JSON bodies become ``str`` (request charset, default UTF-8); others stay bytes."""
    if mimetype.startswith("text/") or mimetype in _TEXT_TYPES or charset:
        return body.decode(charset or "utf-8", errors="replace")
    return body


@dataclass(frozen=True)
class UnstructuredResponse:
    body: bytes
    content_type: str


def encode_result(result: Any) -> UnstructuredResponse:
    """Accept ``str``, ``bytes`` or ``(str|bytes, {"mimetype": ..., "charset": ...})``."""
    meta: dict[str, Any] = {}
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], dict | type(None)):
            raise TypeError("score_unstructured must return data or (data, {'mimetype': ...})")
        result, meta = result[0], result[1] or {}
    if result is None:
        result = b""
    if isinstance(result, str):
        charset = meta.get("charset") or "utf-8"
        mimetype = meta.get("mimetype") or "text/plain"
        return UnstructuredResponse(result.encode(charset), f"{mimetype}; charset={charset}")
    if isinstance(result, bytes | bytearray):
        mimetype = meta.get("mimetype") or "application/octet-stream"
        charset = meta.get("charset")
        content_type = f"{mimetype}; charset={charset}" if charset else mimetype
        return UnstructuredResponse(bytes(result), content_type)
    raise TypeError(
        f"score_unstructured returned {type(result).__name__}; expected str, bytes or a tuple"
    )
