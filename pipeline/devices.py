"""Device and dtype names ('auto' | 'cpu' | 'cuda', 'auto' | 'fp32' | 'fp16' | 'bf16') -> torch objects.
A GPU is used whenever torch sees one and the name is 'auto'."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> cuda when torch sees a GPU, else cpu; 'cuda' without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but torch sees no GPU")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA, fp32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto | {' | '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
