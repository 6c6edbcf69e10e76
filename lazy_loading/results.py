"""What a download reports for each file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileResult:
    """How one artifact became present."""

    display: str
    target: Path
    size: int
    etag: str
    status: str  # "fetched" | "resumed" | "cached" | "offline"
    seconds: float
    bytes_fetched: int

    def as_dict(self) -> dict[str, object]:
        return {"path": self.display, "size": self.size, "etag": self.etag,
                "status": self.status, "seconds": round(self.seconds, 3),
                "bytes_fetched": self.bytes_fetched}
