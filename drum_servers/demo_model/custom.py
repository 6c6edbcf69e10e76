"""Sample DRUM unstructured model: a linear model whose weights arrive by lazy loading.

``artifacts/model.json`` holds the bias and dimension; ``artifacts/weights.bin`` holds ``dim``
little-endian float64 weights. ``load_model`` refuses to start unless both are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any


def load_model(code_dir: str) -> dict[str, Any]:
    artifacts = Path(code_dir) / "artifacts"
    meta = json.loads((artifacts / "model.json").read_text())
    raw = (artifacts / "weights.bin").read_bytes()
    if len(raw) != 8 * meta["dim"]:
        raise ValueError(f"weights.bin has {len(raw)} bytes, expected {8 * meta['dim']}")
    return {
        "bias": float(meta["bias"]),
        "weights": struct.unpack(f"<{meta['dim']}d", raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def score_unstructured(model: dict[str, Any], data: str | bytes, **kwargs: Any) -> Any:
    """Input ``{"x": [..]}``; output the dot product with the first ``len(x)`` weights + bias."""
    x = json.loads(data)["x"]
    weights = model["weights"]
    prediction = sum(a * b for a, b in zip(x, weights, strict=False)) + model["bias"]
    body = {"prediction": prediction, "weights_sha256": model["sha256"], "pid": os.getpid()}
    return json.dumps(body), {"mimetype": "application/json", "charset": "utf-8"}
