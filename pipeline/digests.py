"""sha256 digests of files, byte strings and arrays (hex). The one implementation the training,
generation, evaluation and registry code and the model fingerprints share."""
from __future__ import annotations

import hashlib
import os
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (64 hex chars), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_array(a: Any) -> str:
    """sha256 over an array's dtype, shape and C-order bytes (a numpy array or anything np.asarray takes)."""
    import numpy as np

    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()
