"""Crash points for the crash-consistency tests: inert unless `PERSONA_CRASH_AT` is set.

`PERSONA_CRASH_AT=POINT:N` SIGKILLs this process the N-th time it passes `crash_point(POINT)`, to
prove that a kill at that moment loses and duplicates nothing (tests/test_crash_consistency.py).
Points: `result` (the driver received a batch's results, not yet committed), `commit` (right after a
part was committed), `consolidate` (parts read, table not written), `table` (table written, metrics
not), `rename` (a temp file written and synced, not yet renamed into place), `tar` (a shard tar
written), `index` (every shard written, index.json not yet).
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(point: str) -> None:
    """SIGKILL this process when `PERSONA_CRASH_AT` names this point and its count is reached."""
    spec = os.environ.get("PERSONA_CRASH_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
