"""What every model wrapper reports about itself: name, fingerprint, real or random weights, license.

A backend that runs without real weights must say so loudly: `announce` logs a warning and the
`ModelInfo.as_dict()` that stages store in their metadata carries `weights_real: False`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.digests import sha256_file

log = logging.getLogger("persona.models")

_FP_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model as recorded in item metadata, shards and MLflow."""

    name: str  # e.g. "mediapipe-face-mesh", "arcface-w600k_mbf"
    fingerprint: str  # content hash of the weights (or of the config for random init)
    weights_real: bool  # False when the model runs with random weights
    license: str  # license of the weights, e.g. "Apache-2.0", "non-commercial (InsightFace)"
    source: str = ""  # path or package the weights came from

    def as_dict(self) -> dict:
        return asdict(self)


def file_fingerprint(path: str | os.PathLike, length: int = 16) -> str:
    """sha256 of a file's bytes (hex, truncated), cached per (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FP_CACHE:
        _FP_CACHE[key] = sha256_file(p)
    return _FP_CACHE[key][:length]


def text_fingerprint(*parts: object, length: int = 16) -> str:
    """sha256 over the repr of the given parts (for configs / random-init models)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def announce(info: ModelInfo) -> None:
    """Log which model is in use; a loud warning when its weights are random."""
    if info.weights_real:
        log.info("model %s (%s) fingerprint=%s", info.name, info.source or "bundled", info.fingerprint)
    else:
        log.warning(
            "!!! model %s runs with RANDOM WEIGHTS (no checkpoint configured): its outputs are NOT "
            "meaningful and are tagged weights_real=false !!!",
            info.name,
        )
