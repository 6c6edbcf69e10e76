"""DRUM's unstructured prediction contract, independent of the web framework.

Both directions follow DRUM's ``unstructured_helpers`` exactly: a missing or empty Content-Type
is ``text/plain``; only ``text/*`` and ``application/json`` are text, decoded strictly with the
request's charset (default UTF-8, then passed as ``charset``); anything else stays ``bytes``,
with ``charset`` passed only when the client sent one.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from typing import Any

CHARSET_DEFAULT = "utf-8"
MIMETYPE_TEXT_DEFAULT = "text/plain"
MIMETYPE_BINARY_DEFAULT = "application/octet-stream"


def parse_content_type(header: str | None) -> tuple[str, str | None]:
    """``text/plain; charset="latin-1"`` -> ``("text/plain", "latin-1")``; ``("", None)`` for
    no header (RFC 2045 parameters, quotes included, as werkzeug parses them for DRUM)."""
    if not header or not header.strip():
        return "", None
    message = Message()
    message["content-type"] = header
    mimetype = header.partition(";")[0].strip().lower()
    charset = message.get_param("charset")
    return mimetype, charset if isinstance(charset, str) else None


def decode_body(body: bytes, mimetype: str, charset: str | None
                ) -> tuple[str | bytes, str, str | None]:
    """``(data, mimetype, charset)`` as the hook receives them; raises ``LookupError`` or
    ``UnicodeDecodeError`` for a body its charset cannot decode, as DRUM does."""
    mimetype = mimetype or MIMETYPE_TEXT_DEFAULT
    if mimetype.startswith("text/") or mimetype == "application/json":
        charset = charset if charset is not None else CHARSET_DEFAULT
        return body.decode(charset), mimetype, charset
    return body, mimetype, charset


@dataclass(frozen=True)
class UnstructuredResponse:
    body: bytes
    content_type: str | None


def encode_result(result: Any) -> UnstructuredResponse:
    """Accept ``str``, ``bytes``, ``None`` or ``(data, {"mimetype": ..., "charset": ...})``:
    text defaults to ``text/plain; charset=utf-8``, bytes to ``application/octet-stream``."""
    meta: dict[str, Any] = {}
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], dict | type(None)):
            raise TypeError("score_unstructured must return data or (data, {'mimetype': ...})")
        result, meta = result[0], result[1] or {}
    if isinstance(result, str | type(None)):
        mimetype = meta.get("mimetype", MIMETYPE_TEXT_DEFAULT)
        charset = meta.get("charset", CHARSET_DEFAULT)
        body = b"" if result is None else result.encode(charset)
    elif isinstance(result, bytes | bytearray):
        mimetype = meta.get("mimetype", MIMETYPE_BINARY_DEFAULT)
        charset = meta.get("charset")
        body = bytes(result)
    else:
        raise TypeError(f"score_unstructured returned {type(result).__name__}; "
                        "expected str, bytes or a tuple")
    if mimetype is None:
        return UnstructuredResponse(body, None)
    return UnstructuredResponse(body, f"{mimetype}; charset={charset}" if charset else mimetype)
