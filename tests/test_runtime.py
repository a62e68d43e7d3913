"""The Ray map helper: per-item failures are recorded, worker crashes do not lose or repeat items."""
import functools
import os

import pytest

from pipeline.config import RuntimeConfig
from pipeline.runtime import map_batches


class _Fn:
    """Doubles `x`; raises on x == 3; kills its own process on x == 5 (a segfaulting decoder)."""

    def __init__(self, crash_marker: str | None):
        self.crash_marker = crash_marker

    def __call__(self, batch):
        out = []
        for it in batch:
            if it["x"] == 3:
                raise ValueError("bad item 3")
            if it["x"] == 5 and self.crash_marker:
                os._exit(1)
            out.append([{"key": it["key"], "status": "ok", "error": "", "y": it["x"] * 2}])
        return out


def _run(executor, crash):
    items = [{"key": f"k{i}", "x": i} for i in range(12)]
    cfg = RuntimeConfig(executor=executor, progress=False, num_cpus=2)
    rows = []
    for batch, results in map_batches(functools.partial(_Fn, "crash" if crash else None), items, 4, cfg):
        assert len(batch) == len(results)
        for r in results:
            rows.extend(r)
    return {r["key"]: r for r in rows}


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_item_failure_recorded_others_succeed(executor):
    rows = _run(executor, crash=False)
    assert sorted(rows) == sorted(f"k{i}" for i in range(12))
    assert rows["k3"]["status"] == "error" and "bad item 3" in rows["k3"]["error"]
    assert all(rows[f"k{i}"]["y"] == 2 * i for i in range(12) if i != 3)


def test_worker_crash_isolated_to_its_item():
    rows = _run("ray", crash=True)
    assert sorted(rows) == sorted(f"k{i}" for i in range(12)), "items lost or duplicated"
    assert rows["k5"]["status"] == "worker_crashed"
    assert rows["k3"]["status"] == "error"
    assert all(rows[f"k{i}"]["status"] == "ok" for i in range(12) if i not in (3, 5))
