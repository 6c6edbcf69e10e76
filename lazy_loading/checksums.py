"""Integrity digests: S3 full-object checksums and the config's optional SHA-256.

CRC32, SHA-1 and SHA-256 come from ``zlib``/``hashlib``; CRC32C and CRC64NVME (the default of
current AWS SDKs) and the combining of per-part CRCs come from ``awscrt``, AWS's own library.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib
from typing import Protocol


class Digest(Protocol):
    def update(self, data: bytes | memoryview) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")

    @property
    def value(self) -> int:
        return self._value


class _CrtCrc:
    def __init__(self, name: str, width: int) -> None:
        from awscrt import checksums

        self._fn = getattr(checksums, name)
        self._value = 0
        self._width = width

    def update(self, data: bytes | memoryview) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return int(self._value).to_bytes(self._width, "big")

    @property
    def value(self) -> int:
        return int(self._value)


def _crt_available() -> bool:
    try:
        import awscrt.checksums  # noqa: F401
    except ImportError:
        return False
    return True


S3_ALGORITHMS = ("ChecksumCRC64NVME", "ChecksumCRC32C", "ChecksumCRC32", "ChecksumSHA256", "ChecksumSHA1")


def new_digest(algorithm: str) -> Digest | None:
    """A fresh digest for an S3 checksum field name or ``sha256``; ``None`` if unsupported here."""
    if algorithm == "ChecksumCRC32":
        return _Crc32()
    if algorithm in ("ChecksumSHA256", "sha256"):
        return hashlib.sha256()
    if algorithm == "ChecksumSHA1":
        return hashlib.sha1()
    if algorithm == "ChecksumCRC32C" and _crt_available():
        return _CrtCrc("crc32c", 4)
    if algorithm == "ChecksumCRC64NVME" and _crt_available():
        return _CrtCrc("crc64nvme", 8)
    return None


_COMBINERS = {"ChecksumCRC32": ("combine_crc32", 4), "ChecksumCRC32C": ("combine_crc32c", 4),
               "ChecksumCRC64NVME": ("combine_crc64nvme", 8)}


def combinable(algorithm: str) -> bool:
    """Whether per-part values of ``algorithm`` can be combined into the whole object's, so a
    multi-part download verifies without reading the file back (needs awscrt)."""
    if algorithm not in _COMBINERS or not _crt_available():
        return False
    from awscrt import checksums

    return hasattr(checksums, _COMBINERS[algorithm][0])


def combine_parts(algorithm: str, parts: list[tuple[int, int]]) -> str:
    """The object's checksum from ``(crc, length)`` of its parts in order, S3-encoded."""
    from awscrt import checksums

    name, width = _COMBINERS[algorithm]
    combine = getattr(checksums, name)
    value = 0
    for index, (crc, length) in enumerate(parts):
        value = crc if index == 0 else combine(value, crc, length)
    return encode(algorithm, int(value).to_bytes(width, "big"))


def encode(algorithm: str, raw: bytes) -> str:
    """S3 checksums are base64; the config's sha256 is hex."""
    return raw.hex() if algorithm == "sha256" else base64.b64encode(raw).decode("ascii")


_MULTIPART_ETAG = re.compile(r"-\d+\"?$")


def pick_s3_checksum(head: dict[str, object]) -> tuple[str, str] | None:
    """The strongest full-object checksum in a HeadObject response that we can compute.

    A checksum counts as full-object only when the store says so (``ChecksumType:
    FULL_OBJECT``) or the object is a single-part upload. Composite checksums of multipart
    uploads are checksums of part checksums: they cannot be recomputed without the upload's
    part boundaries, and some stores (moto) return them without any mark. A download is never
    failed on a value we cannot interpret, so those are skipped.
    """
    kind = str(head.get("ChecksumType") or "").upper()
    multipart_upload = bool(_MULTIPART_ETAG.search(str(head.get("ETag") or "")))
    if kind != "FULL_OBJECT" and (kind or multipart_upload):
        return None
    for algorithm in S3_ALGORITHMS:
        value = head.get(algorithm)
        if isinstance(value, str) and value and "-" not in value and new_digest(algorithm):
            return algorithm, value
    return None


class DigestSet:
    """Several digests fed by one pass over the data; ``reset`` when a whole-body GET restarts."""

    def __init__(self, algorithms: list[str]) -> None:
        self.algorithms = [a for a in algorithms if new_digest(a) is not None]
        self.reset()

    def reset(self) -> None:
        self._digests: dict[str, Digest] = {a: new_digest(a) for a in self.algorithms}  # type: ignore[misc]

    def __bool__(self) -> bool:
        return bool(self.algorithms)

    def update(self, data: bytes | memoryview) -> None:
        for digest in self._digests.values():
            digest.update(data)

    def encoded(self, algorithm: str) -> str:
        return encode(algorithm, self._digests[algorithm].digest())

    def value(self, algorithm: str) -> int:
        """The running CRC as an integer (CRC algorithms only), for ``combine_parts``."""
        return int(self._digests[algorithm].value)  # type: ignore[attr-defined]
