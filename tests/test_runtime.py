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


class _Flaky:
    """Doubles `x`; while the marker file exists, item k5 fails: an exception (local) or a crash of its
    worker process (ray) - failures of the run, not of the item."""

    def __init__(self, marker: str, crash: bool):
        self.marker, self.crash = marker, crash

    def __call__(self, batch):
        out = []
        for it in batch:
            if it["key"] == "k5" and os.path.exists(self.marker):
                if self.crash:
                    os._exit(1)
                raise MemoryError("out of memory (injected)")
            out.append([{"key": it["key"], "status": "ok", "error": "", "y": it["x"] * 2}])
        return out


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_failure_of_the_run_is_retried_by_the_next_run(tmp_path, executor):
    import pyarrow as pa

    from pipeline.stage import StageSpec, run_item_stage
    from pipeline.store import ItemStore

    marker = tmp_path / "failing"
    marker.touch()
    spec = StageSpec("toy", code="c", params_hash="p", columns={"y": pa.int64()}, batch_size=3)
    cfg = RuntimeConfig(executor=executor, progress=False, num_cpus=2, part_size=2, max_attempts=3)
    factory = functools.partial(_Flaky, str(marker), executor == "ray")
    items = lambda: [{"key": f"k{i}", "x": i} for i in range(8)]  # noqa: E731
    store = ItemStore(tmp_path, "toy")
    table, stats = run_item_stage(spec, store, items(), factory, cfg)
    bad = table.set_index("key").loc["k5"]
    assert bad["status"] == ("worker_crashed" if executor == "ray" else "error")
    assert "attempt 1 of 3: retried by the next run" in bad["error"]
    assert stats.retrying == 1 and stats.computed == 8 and stats.counts["ok"] == 7
    marker.unlink()
    table, stats = run_item_stage(spec, store, items(), factory, cfg)
    assert stats.computed == 1 and stats.retrying == 0 and (table["status"] == "ok").all()
    assert list(table["y"]) == [2 * i for i in range(8)]
    table, stats = run_item_stage(spec, store, items(), factory, cfg)
    assert stats.computed == 0
