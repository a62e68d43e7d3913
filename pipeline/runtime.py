"""Ray runtime: in-process by default, a cluster when `RAY_ADDRESS` (or runtime.address) is set.

`map_batches` runs a batch function over items and streams results back to the caller in
completion order, with progress (items/s, ETA), turning failures into per-item error rows instead
of crashing. Where the work runs:

- in this process, when `runtime.executor` is `local`, or when fewer than `runtime.inline_below`
  items are to be computed (and the stage needs no GPU this machine lacks): no Ray start, no actor
  start, the same worker code, pinned to one thread (`pinned_threads`: OpenMP/BLAS, torch,
  onnxruntime) like a 1-CPU actor, so the bytes equal an actor run's. No crash isolation: the stage
  runner falls back to actors when an in-process run died (pipeline/stage.py);
- otherwise on a pool of Ray actors (one model load per actor, `_Worker`). The pool is the
  process's: its actors stay up across the stages of a run (`persona build`: one Ray session, warm
  worker processes; an actor keeps the last built worker per factory, so a stage that uses the
  same model as the one before finds it loaded) and are released by `release_pools()` or at exit.

The pool autoscales with the pending work: it grows to one actor per pending batch, capped by
`runtime.workers` when set, else by what the cluster holds (checked again every few seconds, so a
node that joins mid-stage gets actors and work) or, on an autoscaling cluster (`runtime.autoscale`;
`auto` detects the autoscaler), by `runtime.max_workers`: actors that do not fit yet wait for the
autoscaler, which is also asked for their resources (`ray.autoscaler.sdk.request_resources`). GPU
stages ask for GPUs (on a cluster without GPUs and without an autoscaler they run on CPU actors). A
worker with a `prepare(batch)` / `infer(batch, prepared)` split runs two batches at a time: the CPU
decoding of the next batch overlaps the (GPU) inference of the current one.

Failures:
- an exception for a batch -> each item is retried alone; one that still fails gets status
  `error` and the exception text;
- a worker process that dies (segfault, OOM, lost node) -> a new actor replaces it and its
  in-flight batches are retried item by item; an item that kills its worker again gets
  `worker_crashed`. A replacement gets work only once it is up, so one that cannot be placed (its
  node is gone) never blocks the run: the surviving actors finish the work;
- a worker whose factory raises (a model that cannot load) -> RuntimeError, the stage stops.
Nothing is committed by the workers: the driver receives each result exactly once. Blobs the
workers wrote are made durable once per batch (`store.sync_written`) before the result is returned.
`error` and `worker_crashed` (`TRANSIENT`) record failures of the run, not verdicts about the input:
the stage runner retries them on later runs (pipeline/stage.py).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from typing import Any, Callable, Iterator, Optional, Sequence

from .config import RuntimeConfig
from .storage import storage_env
from .store import sync_written

log = logging.getLogger("persona.runtime")

BatchFn = Callable[[list[dict]], list[list[dict]]]
Factory = Callable[[], BatchFn]

ERROR = "error"  # the batch function raised for this item
WORKER_CRASHED = "worker_crashed"  # the item killed its worker process twice
TRANSIENT = frozenset({ERROR, WORKER_CRASHED})
DEPTH = 2  # batches queued per actor to hide latency
KEEP_BUILT = 0  # built workers of earlier stages an actor keeps (their models stay shared, `shared_model`)
RESIZE_EVERY_S = 2.0  # how often the pool looks at the cluster's resources


def gpu_count() -> int:
    """GPUs this machine offers (0 on CPU-only machines). torch's count when torch is imported;
    otherwise the NVIDIA device files (within CUDA_VISIBLE_DEVICES), so that a CPU stage does not
    import torch just to learn there is no GPU."""
    if "torch" in sys.modules:
        try:
            import torch

            return torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # pragma: no cover
            return 0
    import glob

    n = len(glob.glob("/dev/nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return n


def ray_address(cfg: RuntimeConfig | None = None) -> str | None:
    return os.environ.get("RAY_ADDRESS") or (cfg.address if cfg else None)


START_ATTEMPTS = 3  # local Ray starts tried when the raylet does not register in time


def ensure_ray(cfg: RuntimeConfig | None = None) -> None:
    """Start Ray in-process (all cores) or attach to the configured cluster; idempotent (one
    session per process: `persona build` runs all its stages in it)."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RuntimeConfig()
    address = ray_address(cfg)
    common = dict(log_to_driver=True, logging_level=logging.WARNING, configure_logging=True)
    if address:
        log.info("attaching to Ray cluster at %s", address)
        env = storage_env()
        if env and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # workers on other nodes read/write the same object store: give them this process's
            # storage settings (inside a Ray Job the job's runtime env already carries them)
            common["runtime_env"] = {"env_vars": env}
        ray.init(address=address, **common)
    else:
        num_cpus = cfg.num_cpus or os.cpu_count() or 1
        num_gpus = cfg.num_gpus if cfg.num_gpus is not None else gpu_count()
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                         object_store_memory=512 * 1024 * 1024, **common)
                return
            except Exception as e:  # Ray waits a fixed 30 s for its raylet: an overloaded machine is not a verdict
                if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                    raise
                log.warning("Ray did not start in time (attempt %d of %d, machine overloaded?): retrying", attempt,
                            START_ATTEMPTS)
                ray.shutdown()


# ============================================================================================
# one batch


def _error_row(item: dict, status: str, message: str) -> dict:
    return {"key": item["key"], "status": status, "error": message}


def _call(fn: BatchFn, batch: list[dict], lock: Optional[threading.Lock]) -> list[list[dict]]:
    """fn(batch); a worker with `prepare`/`infer` prepares outside `lock` (the CPU part of this
    batch overlaps another batch's inference) and infers inside it."""
    prepare, infer = getattr(fn, "prepare", None), getattr(fn, "infer", None)
    if lock is None or prepare is None or infer is None:
        with lock or contextlib.nullcontext():
            return fn(batch)
    prepared = prepare(batch)
    with lock:
        return infer(batch, prepared)


def process_batch(fn: BatchFn, batch: list[dict], lock: Optional[threading.Lock] = None) -> list[list[dict]]:
    """Run `fn` on a batch; on an exception, retry each item alone and record what still fails."""
    try:
        out = _call(fn, batch, lock)
        if len(out) != len(batch):
            raise RuntimeError(f"batch function returned {len(out)} results for {len(batch)} items")
        return out
    except Exception:
        if len(batch) == 1:
            return [[_error_row(batch[0], ERROR, _exc_text())]]
    results = []
    for item in batch:
        try:
            (res,) = _call(fn, [item], lock)
        except Exception:
            res = [_error_row(item, ERROR, _exc_text())]
        results.append(res)
    return results


def _exc_text() -> str:
    etype, value, _ = sys.exc_info()
    tb = traceback.format_exc(limit=3).strip().splitlines()
    where = tb[-3].strip() if len(tb) >= 3 else ""
    return f"{etype.__name__}: {value} [{where}]"


@contextlib.contextmanager
def pinned_threads(n: int = 1) -> Iterator[None]:
    """What a Ray actor with `num_cpus=n` gets, in this process, for the duration of the block:
    OMP_NUM_THREADS=n (read by libraries initialised inside: torch, onnxruntime sessions of
    pipeline/models), the thread pools of already loaded BLAS/OpenMP libraries limited to n
    (threadpoolctl) and torch's intra-op threads set to n. Same thread counts, same reduction
    orders: the bytes of an in-process run equal an actor run's."""
    saved_env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch_threads = None
    if "torch" in sys.modules:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=n)
    except Exception:  # pragma: no cover - threadpoolctl missing
        limits = None
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)


class _Progress:
    """tqdm progress over items with rate and ETA (stderr), silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _chunks(items: Sequence[dict], n: int) -> list[list[dict]]:
    return [list(items[i : i + n]) for i in range(0, len(items), max(1, n))]


def runs_inline(cfg: RuntimeConfig, n_items: int, num_gpus: float = 0.0) -> bool:
    """Whether `map_batches` would run `n_items` in this process (see the module doc)."""
    if cfg.executor == "local":
        return True
    return 0 < n_items < cfg.inline_below and (not num_gpus or gpu_count() > 0)


def map_batches(
    factory: Factory,
    items: Sequence[dict],
    batch_size: int,
    cfg: RuntimeConfig | None = None,
    num_gpus: float = 0.0,
    workers: int | None = None,
    desc: str = "",
    stats: dict | None = None,
    inline: Optional[bool] = None,
) -> Iterator[tuple[list[dict], list[list[dict]]]]:
    """Yield (batch, results) pairs; results[i] is the list of output rows of batch[i].

    `factory()` is called once per worker (inside the Ray actor, or here) and returns the batch
    function. `inline`: force (True) or forbid (False) the in-process run; None: `runs_inline`.
    `stats`, when given, receives `nodes`: {Ray node id (or "local"): items processed there}.
    """
    cfg = cfg or RuntimeConfig()
    batches = _chunks(items, batch_size)
    if not batches:
        return
    if inline is None:
        inline = runs_inline(cfg, len(items), num_gpus)
    progress = _Progress(len(items), desc, cfg.progress)
    try:
        if inline:
            if cfg.executor != "local":
                log.info("%s: %d item(s) (< runtime.inline_below %d): in this process", desc or "stage",
                         len(items), cfg.inline_below)
            with pinned_threads(1):
                try:
                    fn = factory()
                except Exception as e:  # a model that cannot load: the stage stops (as on actors)
                    raise RuntimeError(f"worker failed to start: {type(e).__name__}: {e}") from e
                for b in batches:
                    res = process_batch(fn, b)
                    sync_written()
                    if stats is not None:
                        stats.setdefault("nodes", {}).setdefault("local", 0)
                        stats["nodes"]["local"] += len(b)
                    progress.update(len(b))
                    yield b, res
            return
        yield from _RayRun(factory, batches, cfg, num_gpus, workers, progress, stats, desc).results()
    finally:
        progress.close()


# ============================================================================================
# models shared by the stages of a process


_MODELS: "OrderedDict[Any, Any]" = OrderedDict()
MODELS_KEPT = 2  # loaded models a process keeps (least recently used dropped first)
_MODELS_LOCK = threading.Lock()


def shared_model(key: Any, load: Callable[[], Any]) -> Any:
    """The model of family `key` (a hashable: name + the params and weights that shape it), loaded
    once per process by `load()`: in an actor of the warm pool (or in-process), a stage whose worker
    asks for the family the previous stage loaded gets it without a reload. The model must be
    usable by consecutive workers (no per-worker state)."""
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        while len(_MODELS) >= MODELS_KEPT:
            _MODELS.popitem(last=False)
        m = _MODELS[key] = load()
        return m


# ============================================================================================
# the actor pool


class WorkerStartError(RuntimeError):
    """A worker factory raised (a model that cannot load): the stage cannot run."""


def _factory_id(factory: Factory) -> str:
    import cloudpickle

    try:
        return hashlib.sha256(cloudpickle.dumps(factory)).hexdigest()[:24]
    except Exception:  # pragma: no cover - unpicklable factories fail at submission anyway
        return f"id-{id(factory)}"


def _worker_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2)
    class _Worker:
        """A generic pool actor: builds the batch function of a factory once (kept for later
        stages that bring the same factory), runs batches of any stage. Two calls at a time: a
        worker with prepare/infer overlaps one batch's decoding with the other's inference; other
        workers run one batch at a time (the run lock)."""

        def __init__(self):
            os.environ["OMP_NUM_THREADS"] = "1"  # what Ray gives a 1-CPU actor, also where it does not
            self.node_id = ray.get_runtime_context().get_node_id()
            self.fns: OrderedDict[str, Any] = OrderedDict()
            self.build_lock = threading.Lock()
            self.run_lock = threading.Lock()

        def ready(self) -> str:
            return self.node_id

        def _fn(self, fid: str, fref: list) -> Any:
            with self.build_lock:
                if fid in self.fns:
                    self.fns.move_to_end(fid)
                    return self.fns[fid]
                while len(self.fns) > KEEP_BUILT:  # release the oldest model before loading another
                    self.fns.popitem(last=False)
                    import gc

                    gc.collect()
                    if "torch" in sys.modules:
                        import torch

                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                try:
                    with pinned_threads(1):
                        fn = ray.get(fref[0])()
                except Exception as e:
                    raise WorkerStartError(f"{type(e).__name__}: {e}") from e
                self.fns[fid] = fn
                return fn

        def run(self, fid: str, fref: list, batch: list[dict]):
            fn = self._fn(fid, fref)
            out = process_batch(fn, batch, self.run_lock)
            sync_written()
            return self.node_id, out

    return _Worker


class _Slot:
    """One position of the pool: its actor and what the driver knows about it."""

    def __init__(self, actor):
        self.actor, self.gen, self.up, self.load, self.exclusive = actor, 0, False, 0, False


class _Pool:
    """The warm actors of one resource shape in this process (kept across map_batches calls)."""

    def __init__(self, num_gpus: float, session: str):
        self.num_gpus, self.session = num_gpus, session
        self.slots: list[_Slot] = []
        self.cls = _worker_class()

    def new_actor(self):
        return self.cls.options(num_cpus=1, num_gpus=self.num_gpus).remote()

    def kill(self) -> None:
        import ray

        if not ray.is_initialized() or _session() != self.session:  # its actors ended with their session
            self.slots = []
            return
        for s in self.slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:
                pass
        self.slots = []


_POOLS: dict[tuple, _Pool] = {}


def _session() -> str:
    """This process's Ray session (a pool from an earlier session has no actors left)."""
    import ray

    return ray.get_runtime_context().get_job_id()


def release_pools() -> None:
    """End the warm actors of this process (and withdraw any autoscaler request)."""
    for p in list(_POOLS.values()):
        p.kill()
    _POOLS.clear()


atexit.register(release_pools)


def _autoscaler_running() -> bool:
    """Whether an autoscaler manages this cluster (it publishes its status in the GCS)."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        return bool(_internal_kv_get(DEBUG_AUTOSCALING_STATUS))
    except Exception:  # pragma: no cover
        return False


def _request(bundles: list[dict]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # pragma: no cover - never fatal: the pending actors are demand too
        log.debug("request_resources failed: %s", e)


class _RayRun:
    """One map_batches call on the actor pool (see the module doc)."""

    def __init__(self, factory, batches, cfg: RuntimeConfig, num_gpus: float, workers, progress, stats, desc=""):
        import ray

        ensure_ray(cfg)
        self.cfg, self.progress, self.stats = cfg, progress, stats
        self.autoscale = cfg.autoscale if isinstance(cfg.autoscale, bool) else (
            bool(ray_address(cfg)) and _autoscaler_running())
        gpus_now = float(ray.cluster_resources().get("GPU", 0))
        self.gpus = float(num_gpus) if (num_gpus and (gpus_now or self.autoscale)) else 0.0
        if num_gpus and not self.gpus:
            log.info("%s: no GPU in the cluster and no autoscaler: running on CPU actors", desc or "stage")
        self.fixed = workers or cfg.workers  # an explicit pool size
        key, session = (self.gpus,), _session()
        if key not in _POOLS or _POOLS[key].session != session:
            _POOLS[key] = _Pool(self.gpus, session)
        self.pool = _POOLS[key]
        self.fid, self.fref = _factory_id(factory), [ray.put(factory)]
        self.queue: deque[list[dict]] = deque(batches)
        self.suspects: deque[tuple[dict, int]] = deque()  # (item, crashes seen when run alone)
        self.inflight: dict[Any, tuple[int, int, list[dict], int, bool]] = {}
        self.starting: dict[Any, tuple[int, int]] = {}  # ready() refs of actors coming up
        self.cap_checked = -math.inf
        self.cap = 0
        self.requested = -1
        for i, s in enumerate(self.pool.slots):  # warm actors: up once they answer
            s.up, s.load, s.exclusive = False, 0, False
            self.starting[s.actor.ready.remote()] = (i, s.gen)

    # ------------------------------------------------------------------ sizing
    def capacity(self) -> int:
        """Actors the pool may hold: runtime.workers, else runtime.max_workers on an autoscaling
        cluster, else what the cluster's resources hold now (re-read every RESIZE_EVERY_S)."""
        if self.fixed:
            return int(self.fixed)
        if self.autoscale:
            return int(self.cfg.max_workers)
        now = time.monotonic()
        if now - self.cap_checked >= RESIZE_EVERY_S:
            import ray

            res = ray.cluster_resources()
            cpus = int(res.get("CPU", 1))
            cap = cpus
            if self.gpus:
                cap = min(cap, int(float(res.get("GPU", 0)) / self.gpus))
            self.cap, self.cap_checked = max(1, cap), now
        return self.cap

    def pending(self) -> int:
        return len(self.queue) + len(self.suspects) + len(self.inflight)

    def resize(self) -> None:
        """Grow the pool to one actor per pending batch, within the capacity; ask the autoscaler."""
        target = min(max(self.cfg.min_workers, self.pending()), self.capacity())
        while len(self.pool.slots) < target:
            s = _Slot(self.pool.new_actor())
            self.pool.slots.append(s)
            self.starting[s.actor.ready.remote()] = (len(self.pool.slots) - 1, s.gen)
        if self.autoscale and target != self.requested:
            _request([{"CPU": 1, **({"GPU": self.gpus} if self.gpus else {})}] * max(target, len(self.pool.slots)))
            self.requested = target

    # ------------------------------------------------------------------ actors
    def replace(self, i: int) -> None:
        import ray

        s = self.pool.slots[i]
        try:
            ray.kill(s.actor, no_restart=True)
        except Exception:
            pass
        for r in [r for r, (j, _) in self.starting.items() if j == i]:
            del self.starting[r]
        s.actor = self.pool.new_actor()
        s.gen += 1
        s.up, s.load, s.exclusive = False, 0, False
        self.starting[s.actor.ready.remote()] = (i, s.gen)

    def submit(self) -> None:
        slots = self.pool.slots[: int(self.fixed)] if self.fixed else self.pool.slots  # runtime.workers: that many
        for i, s in enumerate(slots):
            if s.exclusive or not s.up:
                continue
            if self.suspects and s.load == 0:
                item, crashes = self.suspects.popleft()
                ref = s.actor.run.remote(self.fid, self.fref, [item])
                self.inflight[ref] = (i, s.gen, [item], crashes, True)
                s.load += 1
                s.exclusive = True
                continue
            while s.load < DEPTH and self.queue:
                batch = self.queue.popleft()
                ref = s.actor.run.remote(self.fid, self.fref, batch)
                self.inflight[ref] = (i, s.gen, batch, 0, False)
                s.load += 1

    # ------------------------------------------------------------------ the loop
    def results(self) -> Iterator[tuple[list[dict], list[list[dict]]]]:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

        done = False
        quiet_since = time.monotonic()
        try:
            self.resize()
            self.submit()
            while self.inflight or self.queue or self.suspects:
                if not (self.inflight or self.starting):  # pragma: no cover - every slot is up (busy) or starting
                    raise RuntimeError("no worker left to run the remaining batches")
                ready, _ = ray.wait(list(self.inflight) + list(self.starting), num_returns=1, timeout=RESIZE_EVERY_S)
                if not ready:
                    self.resize()
                    self.submit()
                    if time.monotonic() - quiet_since > 60:
                        quiet_since = time.monotonic()
                        log.warning(
                            "no result for 60 s: %d of %d workers up, %d batches waiting (workers wait for a "
                            "node with free resources%s)", sum(s.up for s in self.pool.slots), len(self.pool.slots),
                            len(self.queue) + len(self.suspects),
                            ": the autoscaler was asked for them" if self.autoscale else "")
                    continue
                quiet_since = time.monotonic()
                ref = ready[0]
                if ref in self.starting:  # an actor came up, or failed to
                    i, gen = self.starting.pop(ref)
                    s = self.pool.slots[i]
                    try:
                        ray.get(ref)
                    except RayActorError as e:
                        if getattr(e, "actor_init_failed", False):
                            raise RuntimeError(f"worker failed to start: {e}") from e
                        log.warning("worker lost while starting (%s); starting another", type(e).__name__)
                        if gen == s.gen:
                            self.replace(i)
                        continue
                    if gen == s.gen:
                        s.up = True
                        self.submit()
                    continue
                i, gen, batch, crashes, alone = self.inflight.pop(ref)
                s = self.pool.slots[i]
                if gen == s.gen:
                    s.load -= 1
                    if alone:
                        s.exclusive = False
                try:
                    node, res = ray.get(ref)
                except WorkerStartError as e:
                    raise RuntimeError(f"worker failed to start: {e}") from None
                except (RayActorError, WorkerCrashedError, ActorUnavailableError) as e:
                    if getattr(e, "actor_init_failed", False):
                        raise RuntimeError(f"worker failed to start: {e}") from e
                    if gen == s.gen:  # replace the dead actor once
                        self.replace(i)
                    if alone and crashes >= 1:
                        log.warning("item %s killed its worker twice: recorded as worker_crashed", batch[0].get("key"))
                        res = [[_error_row(batch[0], WORKER_CRASHED, f"{type(e).__name__}: {e}"[:500])]]
                        self.progress.update(1)
                        yield batch, res
                    else:
                        log.warning("worker died with a batch of %d (%s); retrying each item alone", len(batch),
                                    type(e).__name__)
                        for it in batch:
                            self.suspects.append((it, crashes + 1 if alone else 0))
                    self.resize()
                    self.submit()
                    continue
                if self.stats is not None:
                    nodes = self.stats.setdefault("nodes", {})
                    nodes[node] = nodes.get(node, 0) + len(batch)
                self.progress.update(len(batch))
                yield batch, res
                self.resize()
                self.submit()
            done = True
        finally:
            if self.autoscale:
                _request([])
            if not done or not self.cfg.keep_warm:  # an interrupted run leaves no actor of unknown state
                self.pool.kill()
                _POOLS.pop((self.gpus,), None)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
