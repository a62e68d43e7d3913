"""The Ray map helper: per-item failures are recorded, worker crashes do not lose or repeat items; few
items run in-process with the bytes of an actor run; the actor pool stays warm across stages."""
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
    cfg = RuntimeConfig(executor=executor, progress=False, num_cpus=2, inline_below=0)  # 12 items: actors
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
    cfg = RuntimeConfig(executor=executor, progress=False, num_cpus=2, part_size=2, max_attempts=3, inline_below=0)
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


# ---------------------------------------------------------------------------------------- in-process / warm pool


class _Threads:
    """Records the thread counts its process gives the work (BLAS pools, OMP_NUM_THREADS, torch)."""

    def __init__(self):
        import torch  # noqa: F401  (loaded while building, as a model stack would)

    def __call__(self, batch):
        import torch
        from threadpoolctl import threadpool_info

        blas = sorted({p["num_threads"] for p in threadpool_info()})
        return [[{"key": it["key"], "status": "ok", "error": "", "pid": os.getpid(), "blas": blas,
                  "omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()}] for it in batch]


def test_few_items_run_in_process_pinned_like_an_actor():
    items = [{"key": f"k{i}"} for i in range(3)]
    cfg = RuntimeConfig(executor="ray", progress=False, num_cpus=2, inline_below=8)
    stats: dict = {}
    rows = [r[0] for _, res in map_batches(_Threads, items, 2, cfg, stats=stats) for r in res]
    assert stats["nodes"] == {"local": 3} and {r["pid"] for r in rows} == {os.getpid()}
    cfg.inline_below = 0
    actor = [r[0] for _, res in map_batches(_Threads, items, 2, cfg) for r in res]
    assert os.getpid() not in {r["pid"] for r in actor}
    for a, b in zip(rows, actor):  # the same thread counts as the actor's: same reduction orders
        assert (a["blas"], a["omp"], a["torch"]) == (b["blas"], b["omp"], b["torch"]) == (a["blas"], "1", 1)
    assert all(max(r["blas"]) == 1 for r in rows)


class _Model:
    loads = 0


class _Family:
    """A worker of model family `fam`: the model comes from runtime.shared_model."""

    def __init__(self, fam: str, tag: str):
        from pipeline.runtime import shared_model

        self.tag = tag
        self.model = shared_model(("toy", fam), self._load)

    @staticmethod
    def _load():
        _Model.loads += 1
        return {"loaded_in": os.getpid(), "n": _Model.loads}

    def __call__(self, batch):
        return [[{"key": it["key"], "status": "ok", "error": "", "pid": os.getpid(), "model": id(self.model),
                  "loads": _Model.loads, "tag": self.tag}] for it in batch]


def test_the_pool_stays_warm_across_stages_and_shares_a_model_family():
    from pipeline.runtime import _POOLS, release_pools

    release_pools()
    cfg = RuntimeConfig(executor="ray", progress=False, num_cpus=2, inline_below=0, workers=1)
    items = [{"key": f"k{i}"} for i in range(4)]

    def stage(fam, tag):
        return [r[0] for _, res in map_batches(functools.partial(_Family, fam, tag), items, 2, cfg) for r in res]

    a, b, c = stage("mesh", "align"), stage("mesh", "masks"), stage("clip", "other")
    pids = {r["pid"] for r in a + b + c}
    assert len(pids) == 1 and os.getpid() not in pids, "one warm actor serves the three stages"
    assert {r["tag"] for r in b} == {"masks"}, "each stage runs its own worker"
    assert {r["model"] for r in a} == {r["model"] for r in b} and {r["loads"] for r in a + b} == {1}
    assert {r["loads"] for r in c} == {2}, "another family is loaded"
    assert _POOLS, "kept for the next stage"
    release_pools()
    assert not _POOLS


class _TwoPhase:
    """prepare (CPU decode) / infer (the model): two batches of an actor overlap their phases."""

    def __init__(self, log: str):
        self.log = log

    def _note(self, what, batch):
        import time

        with open(self.log, "a") as f:
            f.write(f"{what} {batch[0]['key']} {time.monotonic():.4f}\n")

    def prepare(self, batch):
        import time

        self._note("prep-start", batch)
        time.sleep(0.3)
        self._note("prep-end", batch)
        return [it["x"] * 10 for it in batch]

    def infer(self, batch, prepared):
        import time

        self._note("infer-start", batch)
        time.sleep(0.3)
        self._note("infer-end", batch)
        return [[{"key": it["key"], "status": "ok", "error": "", "y": p}] for it, p in zip(batch, prepared)]

    def __call__(self, batch):
        return self.infer(batch, self.prepare(batch))


def test_decoding_overlaps_inference_and_results_match_the_plain_call(tmp_path):
    log = tmp_path / "log"
    items = [{"key": f"k{i}", "x": i} for i in range(6)]
    cfg = RuntimeConfig(executor="ray", progress=False, num_cpus=2, inline_below=0, workers=1, keep_warm=False)
    got = {r[0]["key"]: r[0]["y"] for _, res in map_batches(functools.partial(_TwoPhase, str(log)), items, 2, cfg) for r in res}
    assert got == {f"k{i}": 10 * i for i in range(6)}
    ev = [ln.split() for ln in log.read_text().splitlines()]
    spans = {}
    for what, key, t in ev:
        spans.setdefault((what.split("-")[0], key), {})[what.split("-")[1]] = float(t)
    infers = sorted((v["start"], v["end"]) for (w, _), v in spans.items() if w == "infer")
    assert all(a[1] <= b[0] + 1e-3 for a, b in zip(infers, infers[1:])), "inference stays one batch at a time"
    overlap = any(p["start"] < i["end"] and i["start"] < p["end"]
                  for (w1, k1), p in spans.items() if w1 == "prep"
                  for (w2, k2), i in spans.items() if w2 == "infer" and k1 != k2)
    assert overlap, "a batch was decoded while another one was in inference"


def test_a_dead_in_process_run_sends_the_next_run_to_actors(tmp_path):
    import pyarrow as pa

    from pipeline.stage import StageSpec, run_item_stage
    from pipeline.store import ItemStore

    spec = StageSpec("toy", code="c", params_hash="p", columns={"y": pa.int64()}, batch_size=2)
    cfg = RuntimeConfig(executor="ray", progress=False, num_cpus=2, inline_below=16)
    store = ItemStore(tmp_path, "toy")
    items = lambda n: [{"key": f"k{i}", "x": i} for i in range(n)]  # noqa: E731
    run_item_stage(spec, store, items(3), functools.partial(_Fn, None), cfg)
    assert store.report()["executor"] == "in-process" and store.report()["nodes"] == {"local": 3}
    (tmp_path / "runs" / ".toy.inline").write_text("12345")  # what a run killed in-process leaves
    table, stats = run_item_stage(spec, store, items(5), functools.partial(_Fn, None), cfg)
    assert store.report()["executor"] == "ray" and stats.computed == 2
    assert not (tmp_path / "runs" / ".toy.inline").exists()
    assert list(table["key"]) == [f"k{i}" for i in range(5)]


def test_a_ray_start_that_times_out_is_retried(monkeypatch):
    """Ray waits a fixed 30 s for its raylet; on an overloaded machine that start is retried (the
    timeout itself cannot be produced on demand, so ray.init is replaced for this check)."""
    import ray

    from pipeline import runtime

    calls = []

    def init(**kw):
        calls.append(kw)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    runtime.ensure_ray(RuntimeConfig(num_cpus=1))
    assert len(calls) == 2 and calls[1]["num_cpus"] == 1

    def broken(**kw):
        calls.append(kw)
        raise ValueError("bad argument")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError, match="bad argument"):
        runtime.ensure_ray(RuntimeConfig(num_cpus=1))
    assert len(calls) == 3  # another error is not retried
