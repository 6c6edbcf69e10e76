"""AWS Signature Version 4 for the bodiless S3 requests the engine sends itself (HEAD, GET).

Written by hand rather than taken from botocore: importing botocore's signer and HTTP session
costs ~150 ms per process (its compat layer loads awscrt, dateutil and more), a third of a
``drum-servers download`` start, and its request pipeline took about a third of a small object's
request time. The algorithm is AWS's published one, for S3 (the path is signed as sent, not
normalised); ``tests/test_signed_requests.py`` checks every signature against botocore's and
against a server that enforces them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_header(url: str) -> str:
    """The Host a client sends for ``url``: the port only when it is not the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class SigV4Signer:
    """Signs requests for one set of credentials and region; the day's key is derived once."""

    def __init__(self, access_key: str, secret_key: str, session_token: str | None,
                 region: str, service: str = "s3") -> None:
        self._access_key = access_key
        self._secret = secret_key
        self._token = session_token
        self._region = region
        self._service = service
        self._keys: dict[str, bytes] = {}

    def __repr__(self) -> str:  # never the secret or the token
        return f"SigV4Signer(region={self._region!r})"

    def _key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self._secret).encode()
            for part in (day, self._region, self._service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._keys = {day: key}
        return key

    def sign(self, method: str, url: str, headers: dict[str, str],
             now: float | None = None) -> dict[str, str]:
        """``headers`` plus Host, the date, the payload hash, the token and Authorization, with
        every header signed. ``url`` is sent as is: its path must already be percent-encoded,
        and it carries no query."""
        return self.sign_path(method, host_header(url), urlsplit(url).path or "/", headers, now)

    def sign_path(self, method: str, host: str, path: str, headers: dict[str, str],
                  now: float | None = None) -> dict[str, str]:
        """``sign`` for a request to ``host`` (as ``host_header`` gives it) at ``path``: a
        session sending many requests to one host splits its URL once, not per request."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        signed = {**headers, "Host": host, "X-Amz-Date": stamp,
                  "X-Amz-Content-SHA256": EMPTY_SHA256}
        if self._token:
            signed["X-Amz-Security-Token"] = self._token
        canonical = sorted((name.lower(), " ".join(str(value).split()))
                           for name, value in signed.items())
        names = ";".join(name for name, _ in canonical)
        request = "\n".join([
            method, path, "",
            "".join(f"{name}:{value}\n" for name, value in canonical),
            names, EMPTY_SHA256,
        ])
        scope = f"{day}/{self._region}/{self._service}/aws4_request"
        to_sign = "\n".join([_ALGORITHM, stamp, scope,
                             hashlib.sha256(request.encode()).hexdigest()])
        signature = hmac.digest(self._key(day), to_sign.encode(), "sha256").hex()
        signed["Authorization"] = (f"{_ALGORITHM} Credential={self._access_key}/{scope}, "
                                   f"SignedHeaders={names}, Signature={signature}")
        return signed
