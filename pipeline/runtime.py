"""Ray runtime: in-process by default, a cluster when `RAY_ADDRESS` (or runtime.address) is set.

`map_batches` runs a batch function over items on a pool of Ray actors (one model load per actor),
streams results back to the caller in completion order, shows progress (items/s, ETA) and turns
failures into per-item error rows instead of crashing:
- an exception for a batch -> each item is retried alone; one that still fails gets
  status `error` and the exception text;
- a worker process that dies (segfault, OOM, lost node) -> a new actor replaces it and its
  in-flight batches are retried item by item; an item that kills its worker again gets
  `worker_crashed`. A replacement gets work only once it is up, so one that cannot be placed (its
  node is gone) never blocks the run: the surviving actors finish the work;
- a worker whose factory raises (a model that cannot load) -> RuntimeError, the stage stops.
Nothing is committed by the workers: the driver receives each result exactly once.
`error` and `worker_crashed` (`TRANSIENT`) record failures of the run, not verdicts about the input:
the stage runner retries them on later runs (pipeline/stage.py).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from .config import RuntimeConfig
from .storage import storage_env

log = logging.getLogger("persona.runtime")

BatchFn = Callable[[list[dict]], list[list[dict]]]
Factory = Callable[[], BatchFn]

ERROR = "error"  # the batch function raised for this item
WORKER_CRASHED = "worker_crashed"  # the item killed its worker process twice
TRANSIENT = frozenset({ERROR, WORKER_CRASHED})


def gpu_count() -> int:
    """GPUs torch can see on this machine (0 on CPU-only machines)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def ray_address(cfg: RuntimeConfig | None = None) -> str | None:
    return os.environ.get("RAY_ADDRESS") or (cfg.address if cfg else None)


def ensure_ray(cfg: RuntimeConfig | None = None) -> None:
    """Start Ray in-process (all cores) or attach to the configured cluster; idempotent."""
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
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            **common,
        )


def _error_row(item: dict, status: str, message: str) -> dict:
    return {"key": item["key"], "status": status, "error": message}


def process_batch(fn: BatchFn, batch: list[dict]) -> list[list[dict]]:
    """Run `fn` on a batch; on an exception, retry each item alone and record what still fails."""
    try:
        out = fn(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"batch function returned {len(out)} results for {len(batch)} items")
        return out
    except Exception:
        if len(batch) == 1:
            return [[_error_row(batch[0], ERROR, _exc_text())]]
    results = []
    for item in batch:
        try:
            (res,) = fn([item])
        except Exception:
            res = [_error_row(item, ERROR, _exc_text())]
        results.append(res)
    return results


def _exc_text() -> str:
    etype, value, _ = sys.exc_info()
    tb = traceback.format_exc(limit=3).strip().splitlines()
    where = tb[-3].strip() if len(tb) >= 3 else ""
    return f"{etype.__name__}: {value} [{where}]"


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


def map_batches(
    factory: Factory,
    items: Sequence[dict],
    batch_size: int,
    cfg: RuntimeConfig | None = None,
    num_gpus: float = 0.0,
    workers: int | None = None,
    desc: str = "",
    stats: dict | None = None,
) -> Iterator[tuple[list[dict], list[list[dict]]]]:
    """Yield (batch, results) pairs; results[i] is the list of output rows of batch[i].

    `factory()` is called once per worker (inside the Ray actor) and returns the batch function.
    With `cfg.executor == 'local'` everything runs in this process (same contract, no Ray).
    `stats`, when given, receives `nodes`: {Ray node id: items processed there}.
    """
    cfg = cfg or RuntimeConfig()
    batches = _chunks(items, batch_size)
    if not batches:
        return
    progress = _Progress(len(items), desc, cfg.progress)
    try:
        if cfg.executor == "local":
            fn = factory()
            for b in batches:
                res = process_batch(fn, b)
                if stats is not None:
                    stats.setdefault("nodes", {}).setdefault("local", 0)
                    stats["nodes"]["local"] += len(b)
                progress.update(len(b))
                yield b, res
            return
        yield from _map_ray(factory, batches, cfg, num_gpus, workers, progress, stats)
    finally:
        progress.close()


def _map_ray(factory, batches, cfg, num_gpus, workers, progress, stats):
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

    ensure_ray(cfg)
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    use_gpus = num_gpus if (num_gpus and gpus) else 0.0
    if workers is None:
        workers = cfg.workers or cpus
        if use_gpus:
            workers = max(1, min(workers, int(gpus / use_gpus)))
    workers = max(1, min(workers, len(batches)))

    @ray.remote(max_restarts=0, max_task_retries=0)
    class _Worker:  # a Ray actor: one model load, many batches
        def __init__(self, fac):
            self.fn = fac()
            self.node_id = ray.get_runtime_context().get_node_id()

        def ready(self):
            return self.node_id

        def run(self, batch):
            return self.node_id, process_batch(self.fn, batch)

    def new_actor():
        return _Worker.options(num_cpus=1, num_gpus=use_gpus).remote(factory)

    # Slots hold the actor of each pool position; a dead actor is replaced by a fresh one. The first
    # actors fit the cluster's resources and get work at once; a replacement gets work only once it
    # is up, so one that cannot be placed (its node is gone, the others are full) never holds
    # batches back: the live actors finish the queue.
    actors = [new_actor() for _ in range(workers)]
    generation = [0] * workers
    up = [True] * workers
    starting: dict[Any, tuple[int, int]] = {}  # ready() refs of replacements
    load = [0] * workers  # batches in flight per slot
    exclusive = [False] * workers  # slot runs a suspect item alone
    queue: deque[list[dict]] = deque(batches)
    suspects: deque[tuple[dict, int]] = deque()  # (item, crashes seen when run alone)
    inflight: dict[Any, tuple[int, int, list[dict], int, bool]] = {}
    depth = 2  # batches queued per actor to hide latency

    def replace(i):
        try:
            ray.kill(actors[i], no_restart=True)
        except Exception:
            pass
        for r in [r for r, (j, _) in starting.items() if j == i]:
            del starting[r]
        actors[i] = new_actor()
        generation[i] += 1
        up[i], load[i], exclusive[i] = False, 0, False
        starting[actors[i].ready.remote()] = (i, generation[i])

    def submit():
        for i in range(workers):
            if exclusive[i] or not up[i]:
                continue
            if suspects and load[i] == 0:
                item, crashes = suspects.popleft()
                ref = actors[i].run.remote([item])
                inflight[ref] = (i, generation[i], [item], crashes, True)
                load[i] += 1
                exclusive[i] = True
                continue
            while load[i] < depth and queue:
                batch = queue.popleft()
                ref = actors[i].run.remote(batch)
                inflight[ref] = (i, generation[i], batch, 0, False)
                load[i] += 1

    try:
        submit()
        while inflight or queue or suspects:
            if not (inflight or starting):  # pragma: no cover - every slot is up (busy) or starting
                raise RuntimeError("no worker left to run the remaining batches")
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=60.0)
            if not ready:
                log.warning(
                    "no result for 60 s: %d of %d workers up, %d batches waiting (a worker may be "
                    "waiting for a node with free resources)", sum(up), workers, len(queue) + len(suspects),
                )
                continue
            ref = ready[0]
            if ref in starting:  # an actor came up, or failed to
                i, gen = starting.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    if getattr(e, "actor_init_failed", False):
                        raise RuntimeError(f"worker failed to start: {e}") from e
                    log.warning("worker lost while starting (%s); starting another", type(e).__name__)
                    if gen == generation[i]:
                        replace(i)
                    continue
                if gen == generation[i]:
                    up[i] = True
                    submit()
                continue
            i, gen, batch, crashes, alone = inflight.pop(ref)
            if gen == generation[i]:
                load[i] -= 1
                if alone:
                    exclusive[i] = False
            try:
                node, res = ray.get(ref)
            except (RayActorError, WorkerCrashedError, ActorUnavailableError) as e:
                if getattr(e, "actor_init_failed", False):
                    raise RuntimeError(f"worker failed to start: {e}") from e
                if gen == generation[i]:  # replace the dead actor once
                    replace(i)
                if alone and crashes >= 1:
                    log.warning("item %s killed its worker twice: recorded as worker_crashed", batch[0].get("key"))
                    res = [[_error_row(batch[0], WORKER_CRASHED, f"{type(e).__name__}: {e}"[:500])]]
                    progress.update(1)
                    yield batch, res
                else:
                    log.warning("worker died with a batch of %d (%s); retrying each item alone", len(batch), type(e).__name__)
                    for it in batch:
                        suspects.append((it, crashes + 1 if alone else 0))
                submit()
                continue
            if stats is not None:
                nodes = stats.setdefault("nodes", {})
                nodes[node] = nodes.get(node, 0) + len(batch)
            progress.update(len(batch))
            yield batch, res
            submit()
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
