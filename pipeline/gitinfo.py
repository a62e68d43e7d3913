"""The git commit (and dirty state) of a checkout: lineage for training runs, generation records and
benchmark results."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(args: list[str], cwd: Optional[str | os.PathLike]) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=str(cwd or REPO_ROOT), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(cwd: Optional[str | os.PathLike] = None, short: bool = False) -> Optional[str]:
    """`git rev-parse HEAD` of the checkout holding `cwd` (default: this code's); None outside git."""
    out = _git(["rev-parse", *(["--short"] if short else []), "HEAD"], cwd)
    return (out or "").strip() or None


def git_dirty(cwd: Optional[str | os.PathLike] = None) -> Optional[bool]:
    """True when tracked files differ from HEAD (None outside git)."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return None if out is None else bool(out.strip())
